"""Held-out evaluation and training-health measurements.

* :func:`ode_samples` — deterministic Euler ODE samples (no SDE noise) from fixed seeds: the same
  seeds give the same initial noise, so two adapters (or the base model and a trained adapter) are
  compared sample by sample.
* :func:`evaluate` — decodes and scores ODE samples of held-out prompts; works from a
  :class:`~branchgrpo.trainer.BranchGRPOTrainer` or from an :class:`EvalParts`.
* :func:`reward_spread` — the mean over trees of the std of a tree's leaf rewards, before any
  normalisation (how much the samples of one prompt differ: the signal GRPO learns from).
* :func:`reference_kl` — the KL between the policy's and the reference's (adapter off) step
  distributions on a few tree nodes, measured without gradients.

Nothing here changes the adapter or the optimizer; every model evaluation is counted in the results.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from .models.base import VelocityModel
from .schedule import BranchSchedule
from .sde import gaussian_kl, quantize_timestep, step_distribution
from .tree import ModelCallHook, Tree, evaluate_velocity


def seed_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """One fp32 CPU noise latent per seed (``[len(seeds), *latent_shape]``), independent of device."""
    shape = tuple(int(s) for s in latent_shape)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def ode_samples(model: VelocityModel, cond: Any, n: int, schedule: BranchSchedule,
                latent_shape: Sequence[int], seeds: Sequence[int], *, max_batch: int = 16,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                num_steps: int | None = None, hook: ModelCallHook | None = None) -> tuple[torch.Tensor, int]:
    """Euler ODE samples of ``n`` prompts (``cond`` from ``model.encode`` of those prompts) at ``seeds``.

    Sample ``p * len(seeds) + j`` is prompt ``p`` from the noise of ``seeds[j]`` (the same noise for
    every prompt). The sigma schedule is ``schedule``'s (its ``shift`` and ``timestep_quantum``) with
    ``num_steps`` steps (default ``schedule.num_steps``); no step is stochastic. Returns the clean
    latents (fp32, ``[n * len(seeds), *latent_shape]``, on ``device``) and the number of model evaluations.
    """
    if n < 1 or not len(seeds):
        raise ValueError(f"ode_samples needs at least one prompt and one seed (got {n} prompts, {len(seeds)} seeds)")
    device = torch.device(device)
    steps = schedule.num_steps if num_steps is None else int(num_steps)
    sched = BranchSchedule(num_steps=steps, shift=schedule.shift, timestep_quantum=schedule.timestep_quantum,
                           split_steps=())
    sigmas = sched.sigmas()
    k = len(seeds)
    x = seed_noise(seeds, latent_shape).repeat(n, *([1] * len(latent_shape))).to(device)
    index = torch.arange(n).repeat_interleave(k).to(device)
    rows = x.shape[0]
    nfe = 0
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_model = torch.full((rows,), s, dtype=torch.float32, device=device)
        if sched.timestep_quantum > 0:
            s_model = quantize_timestep(s_model, sched.timestep_quantum)
        v = evaluate_velocity(model, x, s_model, cond, index, max_batch, dtype, hook, "eval", (nfe, rows * steps))
        nfe += rows
        x, _ = step_distribution(x, v, torch.tensor(s), torch.tensor(s_next), "ode", 0.0)
    return x, nfe


@dataclass
class EvalParts:
    """What :func:`evaluate` needs when there is no trainer (a benchmark, a script).

    ``rewards``: callables ``fn(images, prompts) -> [N]``; ``reward_weights`` one per reward (default 1).
    ``reference``: a context-manager factory that turns the adapter off (for ``evaluate(..., reference=True)``).
    ``score``: ``score(x0, prompts) -> (rewards [R, N], images or None)`` replaces the built-in decode-then-score
    (a trainer's :meth:`~branchgrpo.trainer.BranchGRPOTrainer.score`, which schedules its models' memory).
    """
    model: VelocityModel
    decode: Callable[[torch.Tensor], torch.Tensor]
    rewards: Sequence[Callable]
    schedule: BranchSchedule
    latent_shape: Sequence[int]
    reward_weights: Sequence[float] = ()
    max_batch: int = 16
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    reference: Callable[[], ContextManager] | None = None
    score: Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @classmethod
    def from_trainer(cls, trainer: Any) -> "EvalParts":
        cfg = trainer.config
        return cls(model=trainer.model, decode=trainer.decode, rewards=trainer.rewards, schedule=cfg.schedule,
                   latent_shape=trainer.latent_shape, reward_weights=cfg.reward_weights,
                   max_batch=cfg.max_batch, device=trainer.device, dtype=trainer.dtype,
                   reference=trainer.reference, score=trainer.score)


@torch.no_grad()
def evaluate(source: Any, prompts: Sequence[str], seeds: Sequence[int], *, reference: bool = False,
             num_steps: int | None = None, keep_images: bool = False,
             hook: ModelCallHook | None = None) -> dict[str, Any]:
    """Reward of ODE samples of ``prompts`` at fixed ``seeds`` (``len(prompts) * len(seeds)`` samples).

    ``source``: a trainer (anything with ``config``, ``model``, ``decode``, ``rewards``,
    ``latent_shape``) or an :class:`EvalParts`. ``reference=True`` samples the base model (adapter off).

    Returns ``reward`` (mean weighted reward), ``reward_std`` (over samples), ``reward/<name>`` (per
    reward, when there are several), ``rewards`` (``[N]`` weighted reward per sample, CPU), ``x0`` (the
    clean latents, CPU), ``nfe`` (model evaluations), ``samples``, and ``images`` (CPU) when ``keep_images``
    (with a ``score`` of its own, e.g. a trainer's, when that scorer keeps them).
    """
    parts = source if isinstance(source, EvalParts) else EvalParts.from_trainer(source)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate: the evaluation prompt list is empty; give at least one held-out prompt.")
    if not parts.rewards:
        raise ValueError("evaluate: no reward given; connect at least one reward model.")
    weights = tuple(parts.reward_weights) or (1.0,) * len(parts.rewards)
    if len(weights) != len(parts.rewards):
        raise ValueError(f"evaluate: {len(weights)} reward weights for {len(parts.rewards)} rewards; "
                         "give one weight per reward.")
    ctx = nullcontext()
    if reference:
        if parts.reference is None:
            raise ValueError("evaluate(reference=True) needs a way to turn the adapter off (EvalParts.reference).")
        ctx = parts.reference()
    with ctx:
        cond = parts.model.encode(prompts)
        x0, nfe = ode_samples(parts.model, cond, len(prompts), parts.schedule, parts.latent_shape, seeds,
                              max_batch=parts.max_batch, device=parts.device, dtype=parts.dtype,
                              num_steps=num_steps, hook=hook)
    sample_prompts = [p for p in prompts for _ in seeds]
    if parts.score is not None:
        per_reward, images = parts.score(x0, sample_prompts)
    else:  # decode everything, then each reward in turn
        mb = max(1, int(parts.max_batch))
        images = torch.cat([parts.decode(x0[start:start + mb]).detach() for start in range(0, x0.shape[0], mb)])
        per_reward = torch.stack([
            torch.cat([torch.as_tensor(fn(images[start:start + mb], sample_prompts[start:start + mb]))
                       .float().flatten().cpu() for start in range(0, x0.shape[0], mb)]) for fn in parts.rewards])
    per_reward = torch.as_tensor(per_reward).float().cpu()
    combined = (torch.tensor(weights, dtype=torch.float32)[:, None] * per_reward).sum(0)
    out: dict[str, Any] = {
        "reward": float(combined.mean()),
        "reward_std": float(combined.std()) if combined.numel() > 1 else 0.0,
        "rewards": combined, "x0": x0.detach().cpu(), "nfe": int(nfe), "samples": int(combined.numel()),
    }
    if len(parts.rewards) > 1:
        for k, fn in enumerate(parts.rewards):
            out[f"reward/{getattr(fn, 'name', k)}"] = float(per_reward[k].mean())
    if keep_images and images is not None:
        out["images"] = images.cpu()
    return out


def reward_spread(rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups (trees) of the unbiased std of ``rewards`` within the group; groups of one count 0."""
    rewards, groups = rewards.detach().float().flatten().cpu(), torch.as_tensor(groups).flatten().cpu()
    if rewards.numel() != groups.numel():
        raise ValueError(f"reward_spread: {rewards.numel()} rewards for {groups.numel()} group ids")
    stds = []
    for g in torch.unique(groups).tolist():
        r = rewards[groups == g]
        stds.append(float(r.std()) if r.numel() > 1 else 0.0)
    return sum(stds) / len(stds) if stds else 0.0


@torch.no_grad()
def reference_kl(model: VelocityModel, cond: Any, tree: Tree, nodes: torch.Tensor, schedule: BranchSchedule,
                 reference: Callable[[], ContextManager], *, max_batch: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 hook: ModelCallHook | None = None) -> tuple[float, int]:
    """Mean KL(policy || reference) of the step out of each of ``nodes`` (tree node ids, not leaves).

    Both distributions are the schedule's SDE step (``schedule.sde``, ``schedule.eta``) from the node's
    latent, one with the adapter on and one inside ``reference()``; they share their std, so the KL is
    the closed form of :func:`~branchgrpo.sde.gaussian_kl` (per element, averaged like the log-prob).
    Returns the KL and the model evaluations spent (two per node).
    """
    nodes = torch.as_tensor(nodes, dtype=torch.long).flatten()
    if nodes.numel() == 0:
        return 0.0, 0
    if bool((tree.depth[nodes] >= tree.num_steps).any()):
        raise ValueError("reference_kl: leaves have no outgoing step; give inner nodes")
    device = torch.device(device)
    sigmas = tree.sigmas
    sigma_one = float(sigmas[1]) if tree.num_steps > 1 else None
    step = tree.depth[nodes]
    s, s_next = sigmas[step].float(), sigmas[step + 1].float()
    s_model = quantize_timestep(s, schedule.timestep_quantum) if schedule.timestep_quantum > 0 else s
    x = tree.latents[nodes].to(device)
    idx = tree.tree[nodes].to(device)
    n = nodes.numel()
    s_in = s_model.to(device)
    v = evaluate_velocity(model, x, s_in, cond, idx, max_batch, dtype, hook, "metrics", (0, 2 * n))
    with reference():
        v_ref = evaluate_velocity(model, x, s_in, cond, idx, max_batch, dtype, hook, "metrics", (n, 2 * n))
    mean, std = step_distribution(x, v, s.to(device), s_next.to(device), schedule.sde, schedule.eta, sigma_one)
    mean_ref, _ = step_distribution(x, v_ref, s.to(device), s_next.to(device), schedule.sde, schedule.eta, sigma_one)
    kl = gaussian_kl(mean, mean_ref, std)
    return float(kl.mean()), 2 * n
