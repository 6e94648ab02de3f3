"""Does a branch schedule give clean leaves? Two checks of residual fork noise.

* :func:`fork_noise_excess` (no model): the largest fork noise of the schedule relative to the noise
  level the sample should have after that step, ``split_noise_scale * std / sigma_next``. A fork whose
  noise is of the order of ``sigma_next`` or larger throws the sample off the model's noise level, and
  the remaining steps no longer remove it.
* :func:`leaf_noise` (with a model): the high-frequency energy of the decoded leaves of one tree over
  that of deterministic (ODE) samples of the same prompts and sigmas. Clean leaves carry about the
  ODE samples' energy (ratio ~1); noisy leaves several times more.

The Branch Schedule node warns with the first; the tests check the shipped workflows with both.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .schedule import BranchSchedule
from .sde import step_distribution

# Measured on the demo model (demo/tiny_t2i.safetensors; one tree for each of 4 prompts; HF ratio = leaves / ODE):
#   sde, eta, steps, splits          scale  excess  HF ratio
#   flowgrpo 0.7, 8, 0,3,5            4.0    2.93    13.40   (pure-noise leaves)
#   flowgrpo 0.7, 8, 0,3,5            1.0    0.73     1.21
#   flowgrpo 0.7, 20, 0,3,6,9         4.0    2.85     6.19   (the old SD3.5 template)
#   flowgrpo 0.7, 20, 0,3,6,9         2.0    1.42     2.09
#   flowgrpo 0.7, 20, 0,3,6,9         1.0    0.71     1.40
#   dancegrpo 0.3, 20, 0,3,6,9        4.0    0.30     1.65   (the paper; shift 8 as for Wan: 0.18, 1.26)
#   dancegrpo 0.3, 10, 0,2,4,6        4.0    0.69     2.08   (the CPU demo)
#: Fork noise scale per SDE kind when the Branch Schedule says 'auto': the paper's 4.0 with DanceGRPO's
#: eta; with Flow-GRPO's std (several times larger at high sigma) 1.0 keeps the leaves as clean as ODE samples.
AUTO_SPLIT_NOISE_SCALE = {"dancegrpo": 4.0, "flowgrpo": 1.0}
#: Above this ``fork_noise_excess`` a fork adds more noise than the next step's own noise level.
EXCESS_LIMIT = 1.0
#: Above this high-frequency energy ratio of leaves over ODE samples, leaves count as noisy.
HF_RATIO_LIMIT = 3.0


def auto_split_noise_scale(sde: str) -> float:
    return AUTO_SPLIT_NOISE_SCALE.get(sde, 1.0)


def fork_noise_excess(schedule: BranchSchedule) -> float:
    """``max over fork steps of scale * std / sigma_next`` (0 without forks); ``std`` is the SDE step's."""
    sig = schedule.sigmas().float()
    sigma_one = float(sig[1]) if sig.numel() > 1 else None
    worst = 0.0
    for i in schedule.split_steps:
        s, s_next = sig[i].reshape(1), sig[i + 1].reshape(1)
        x = torch.zeros(1, 1)
        _, std = step_distribution(x, x, s, s_next, schedule.sde, schedule.eta, sigma_one)
        denom = max(float(s_next), 1e-3)
        worst = max(worst, schedule.split_noise_scale * float(std.flatten()[0]) / denom)
    return worst


def residual_noise_warning(schedule: BranchSchedule) -> str | None:
    """A warning naming the fix when the schedule's forks leave noise in the leaves, else None."""
    excess = fork_noise_excess(schedule)
    if excess <= EXCESS_LIMIT:
        return None
    return (f"split_noise_scale {schedule.split_noise_scale:g} with the {schedule.sde} SDE (eta {schedule.eta:g}) "
            f"forks with {excess:.2f}x the noise level of the next step (clean leaves need <= {EXCESS_LIMIT}): "
            "the leaves keep fork noise and the reward scores noise. Lower split_noise_scale (0 = auto: "
            f"{auto_split_noise_scale(schedule.sde):g} for {schedule.sde}) or eta, "
            "or fork at later steps.")


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared discrete Laplacian per image (``[N, C, H, W]`` or ``[N, C, T, H, W]``): ``[N]``."""
    x = images.float()
    if x.dim() == 5:
        x = x.flatten(1, 2)
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    return lap.pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def leaf_noise(model: Any, prompts: Sequence[str], schedule: BranchSchedule, latent_shape: Sequence[int],
               decode: Callable[[torch.Tensor], torch.Tensor], *, seed: int = 0, max_batch: int = 64,
               ode_per_prompt: int = 4) -> dict:
    """High-frequency energy of the decoded leaves of one tree per prompt against ``ode_per_prompt``
    deterministic (ODE) samples of each prompt with the same sigmas. Use several prompts: one tree's leaves share their early steps.
    Returns ``{"ratio", "leaves_hf", "ode_hf", "noisy"}``."""
    from .evaluate import ode_samples
    from .tree import rollout

    cond = model.encode(list(prompts))
    gens = [torch.Generator().manual_seed(seed + 1000 * p) for p in range(len(prompts))]
    tree = rollout(model, cond, len(prompts), schedule, tuple(latent_shape), generator=gens, max_batch=max_batch)
    ode, _ = ode_samples(model, cond, len(prompts), schedule, latent_shape, range(seed, seed + ode_per_prompt),
                         max_batch=max_batch)
    leaves_hf = float(high_frequency_energy(decode(tree.leaf_x0)).mean())
    ode_hf = float(high_frequency_energy(decode(ode)).mean())
    ratio = leaves_hf / max(ode_hf, 1e-12)
    return {"ratio": ratio, "leaves_hf": leaves_hf, "ode_hf": ode_hf, "noisy": ratio > HF_RATIO_LIMIT}


__all__ = ["AUTO_SPLIT_NOISE_SCALE", "auto_split_noise_scale", "fork_noise_excess", "residual_noise_warning",
           "high_frequency_energy", "leaf_noise", "EXCESS_LIMIT", "HF_RATIO_LIMIT"]
