"""Sigma schedules and the stochastic steps of a flow-matching sampler (SPEC §1).

Convention (rectified flow, as in FLUX / SD3 / Wan): ``x_sigma = (1 - sigma) * x0 + sigma * noise``,
``sigma = 1`` is pure noise, ``sigma = 0`` is data, and the model predicts the velocity
``v ~ noise - x0``. A step goes from ``sigma`` to ``sigma_next < sigma``.

Three step kinds share one function, :func:`step_distribution`, which returns the Gaussian
``N(mean, std^2)`` of the next latent:

* ``"ode"`` — deterministic Euler, ``std = 0`` (no log-probability; never trained).
* ``"dancegrpo"`` — constant diffusion coefficient ``eta`` (DanceGRPO, BranchGRPO).
* ``"flowgrpo"`` — ``sigma_t = a * sqrt(sigma / (1 - sigma))`` (Flow-GRPO, MixGRPO).

Both SDE kinds have the same drift form, ``mean = x + dt * [v + g^2 / (2 sigma) * (x + (1 - sigma) v)]``
with ``dt = sigma_next - sigma`` and ``std = g * sqrt(-dt)``; only ``g`` differs.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

StepKind = Literal["ode", "dancegrpo", "flowgrpo"]
STEP_KINDS: tuple[str, ...] = ("ode", "dancegrpo", "flowgrpo")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def sd3_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 timestep shift ``s*u / (1 + (s-1)*u)``; ``shift = 1`` is the identity."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flux_shift(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
               base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """FLUX's resolution-dependent shift, returned as the equivalent SD3 ``shift``.

    FLUX computes ``mu`` linearly in the number of latent tokens and uses
    ``exp(mu) / (exp(mu) + 1/t - 1)``, which is exactly :func:`sd3_shift` with ``shift = exp(mu)``.
    For a 1024x1024 image (4096 tokens) this gives ``exp(1.15) ~ 3.16``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 to 0: ``linspace(1, 0, N+1)`` through the SD3 shift (float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return sd3_shift(u, shift)


def quantize_timestep(sigma: torch.Tensor, levels: int = 1000) -> torch.Tensor:
    """``int(sigma * levels) / levels``: the timestep the official FLUX code feeds the model."""
    return torch.floor(sigma * levels) / levels


def _diffusion_coefficient(kind: str, sigma: torch.Tensor, eta: float, sigma_one: float | None) -> torch.Tensor:
    if kind == "dancegrpo":
        return torch.full_like(sigma, float(eta))
    if kind == "flowgrpo":
        # At sigma = 1 the Flow-GRPO code replaces the denominator 1 - sigma by 1 - sigma_1
        # (the first shifted sigma after 1) so the coefficient stays finite.
        if sigma_one is None:
            sigma_one = 1.0 - 1e-3
        denom = torch.where(sigma >= 1.0, torch.full_like(sigma, 1.0 - sigma_one), 1.0 - sigma)
        return eta * torch.sqrt(sigma / denom)
    raise ValueError(f"unknown SDE kind {kind!r}; expected one of {STEP_KINDS}")


def step_distribution(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                      kind: str, eta: float, sigma_one: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``x_next`` given ``x`` and the velocity ``v``.

    ``x``, ``v``: ``[N, ...]``; ``sigma``, ``sigma_next``: ``[N]`` (or scalars). Computed in fp32
    whatever the model dtype. ``std`` has shape ``[N, 1, ..., 1]`` (zeros for ``"ode"``).
    ``sigma_one`` is the schedule's first sigma below 1 (Flow-GRPO's guard at sigma = 1).
    """
    x = x.float()
    v = v.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma_next.dim() == 0:
        sigma_next = sigma_next.expand(x.shape[0])
    view = (-1,) + (1,) * (x.dim() - 1)
    s = sigma.reshape(view)
    dt = (sigma_next - sigma).reshape(view)  # < 0
    if kind == "ode":
        return x + dt * v, torch.zeros_like(s)
    g = _diffusion_coefficient(kind, sigma, eta, sigma_one).reshape(view)
    # Score of the marginal, written through v: s(x) = -(x + (1 - sigma) v) / sigma.
    drift = v + (g * g) / (2.0 * s) * (x + (1.0 - s) * v)
    mean = x + dt * drift
    std = (g * torch.sqrt(-dt)).clamp_min(1e-8)
    return mean, std


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``sample`` under ``N(mean, std^2)``, **averaged** over all non-batch elements.

    Computed in fp32. The mean (not the sum) follows DanceGRPO / Flow-GRPO / BranchGRPO: a sum over
    the ~10^5 elements of a FLUX latent would make log-probability differences of order 10^3 between
    nearly identical policies, so ``exp`` of the difference (the PPO ratio) would overflow and the clip
    range would have to depend on the resolution. The per-element mean keeps the ratio near 1 and the
    clip range (1e-3 / 1e-4) meaningful at any latent size, including video. Returns ``[N]``.
    """
    sample = sample.float()
    mean = mean.float()
    std = std.float()
    logp = -((sample - mean) ** 2) / (2.0 * std * std) - torch.log(std) - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def gaussian_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form ``KL(N(mean_a, std^2) || N(mean_b, std^2))`` per element, averaged like the log-prob.

    For two Gaussians with the same std this is ``(mean_a - mean_b)^2 / (2 std^2)``. Returns ``[N]``.
    """
    d = mean_a.float() - mean_b.float()
    return (d * d / (2.0 * std.float() ** 2)).flatten(1).mean(dim=1)
