"""DiffusionNFT (``diffusionnft``): implicit positive / negative policies on re-noised clean samples.

``v+ = b v + (1 - b) v_old`` and ``v- = (1 + b) v_old - b v``; their x0 errors, weighted by the advantage mapped to
``[0, 1]``, make the loss. ``v_old`` is an exponential moving average of the adapter, which also samples the
rollouts (official code: ``config/nft.py``; docs/methods.md).
"""
from __future__ import annotations

import torch

from .common import mean_per_sample, one_call_per_part, train_per_sample
from .config import ObjectiveConfig

NAME = "diffusionnft"


def defaults() -> ObjectiveConfig:
    # config/nft.py: beta 1.0, decay_type 1 (min(0.001 n, 0.5)), train.beta (KL) 1e-4, 9 of 10 steps
    return ObjectiveConfig(name=NAME, train_timesteps=9, timestep_fraction=0.99, nft_beta=1.0,
                           kl_beta=1e-4, old_decay_rate=0.001, old_decay_max=0.5, sample_with_old_after=0)


def needs_old_forward(cfg: ObjectiveConfig) -> bool:
    return True


def needs_reference(cfg: ObjectiveConfig) -> bool:
    return cfg.kl_beta > 0


def nft_reward_weight(adv: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality weight ``r = clamp(clamp(A, -c, c) / c / 2 + 1/2, 0, 1)``."""
    a = adv.clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, adv_clip: float,
             weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample DiffusionNFT loss ``c * (r L+ + (1 - r) L-) / beta``.

    ``L+- = mean((x0+- - x0)^2 / w+-)`` with ``x0+- = xt - t v+-``; ``w+- = max(mean|x0+- - x0|, 1e-5)``
    is detached (the adaptive weighting); pass ``weights`` to fix it (gradient checks).
    """
    view = (-1,) + (1,) * (x0.dim() - 1)
    t = t.reshape(view).to(x0.dtype)
    v_pos = beta * v + (1.0 - beta) * v_old.detach()
    v_neg = (1.0 + beta) * v_old.detach() - beta * v
    x0_pos = xt - t * v_pos
    x0_neg = xt - t * v_neg
    if weights is None:
        with torch.no_grad():
            w_pos = mean_per_sample((x0_pos - x0).abs()).clamp_min(1e-5)
            w_neg = mean_per_sample((x0_neg - x0).abs()).clamp_min(1e-5)
    else:
        w_pos, w_neg = weights
    loss_pos = mean_per_sample((x0_pos - x0) ** 2) / w_pos
    loss_neg = mean_per_sample((x0_neg - x0) ** 2) / w_neg
    return adv_clip * (r * loss_pos + (1.0 - r) * loss_neg) / beta


def sample_loss(u, part, v, v_old, v_ref, adv):
    cfg = u.cfg
    vo = v_old if v_old is not None else v.detach()
    return nft_loss(v, vo, part.xt, part.x0, part.t, nft_reward_weight(adv, cfg.adv_clip), cfg.nft_beta,
                    cfg.adv_clip)


calls = one_call_per_part


def train_unit(u, unit, eps_u, t_val) -> None:
    train_per_sample(u, unit, eps_u, t_val, sample_loss)
