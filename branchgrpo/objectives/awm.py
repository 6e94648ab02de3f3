"""Advantage Weighted Matching (``awm``): the flow-matching error as a log-likelihood inside a PPO ratio.

The negative (generalised-Huber weighted) flow-matching error of a re-noised clean sample is its log-likelihood;
the loss is PPO-clip on it with the group advantage, plus a KL to the reference and one to an EMA policy
(official code: ``config/dgx_awm.py``; docs/methods.md).
"""
from __future__ import annotations

import torch

from .common import mean_per_sample, one_call_per_part, train_per_sample, velocity_kl
from .config import ObjectiveConfig

NAME = "awm"


def defaults() -> ObjectiveConfig:
    # config/dgx_awm.py (geneval, no CFG): 6 stratified timesteps of steps [1, 0.9 N), ghuber 0.25,
    # clip 1, advantage max 1, KL 1e-3, EMA-KL 1 with decay min(0.001 n, 0.3)
    return ObjectiveConfig(name=NAME, train_timesteps=6, first_step=1, timestep_fraction=0.9,
                           timestep_sampling="stratified", awm_weighting="ghuber", ghuber_power=0.25,
                           awm_adv_max=1.0, awm_clip_range=1.0, kl_beta=1e-3, old_kl_beta=1.0,
                           old_decay_rate=0.001, old_decay_max=0.3)


def needs_old_forward(cfg: ObjectiveConfig) -> bool:
    return cfg.old_kl_beta > 0


def needs_reference(cfg: ObjectiveConfig) -> bool:
    return cfg.kl_beta > 0


def awm_logprob(v: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber",
                power: float = 0.25) -> torch.Tensor:
    """AWM's log-likelihood surrogate per sample: ``-mse(v, eps - x0)``, optionally weighted.

    ``"t"``: ``-t * mse``; ``"ghuber"``: ``-t * ((mse + 1e-10)^p - (1e-10)^p) / p``.
    """
    mse = mean_per_sample((v - target) ** 2)
    t = t.reshape(-1).to(mse.dtype)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "ghuber":
        return -((mse + 1e-10) ** power - 1e-10 ** power) * t / power
    raise ValueError(f"unknown AWM weighting {weighting!r}")


def awm_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float
             ) -> torch.Tensor:
    """Per-sample ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logp - logp_old)``."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


def sample_loss(u, part, v, v_old, v_ref, adv):
    cfg = u.cfg
    logp = awm_logprob(v, part.target, part.t, cfg.awm_weighting, cfg.ghuber_power)
    # On-policy: the old log-likelihood is the current one, detached (ratio 1, gradient -A grad logp).
    per = awm_loss(logp, logp.detach(), adv / cfg.adv_clip * cfg.awm_adv_max, cfg.awm_clip_range)
    if cfg.old_kl_beta > 0 and v_old is not None:
        per = per + cfg.old_kl_beta * velocity_kl(v, v_old)
    return per


calls = one_call_per_part


def train_unit(u, unit, eps_u, t_val) -> None:
    train_per_sample(u, unit, eps_u, t_val, sample_loss)
