"""DGPO (``dgpo``): a DPO-style preference of each group's better samples over its worse ones.

On denoising errors of re-noised clean samples relative to the reference model, with noise shared per group,
clipped against an EMA policy (official code: ``config/dgpo_wocfg.py``; docs/methods.md). The term couples a group
(``softplus`` of a sum over it), so a group larger than ``max_train_batch`` is trained in two passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import mean_per_sample, one_call_per_part, velocity_kl
from .config import ObjectiveConfig

NAME = "dgpo"


def defaults() -> ObjectiveConfig:
    # config/dgpo_wocfg.py (geneval): 4 of the steps 0..4 of 10, shared noise per group, beta_dpo 100,
    # clip_dsm 1e-3 against the EMA (decay min(0.001 n, 0.3)), KL 0.02, EMA sampling after 500 steps
    return ObjectiveConfig(name=NAME, train_timesteps=4, timestep_fraction=0.5, shared_noise=True,
                           dpo_beta=100.0, dgpo_clip_range=1e-3, kl_beta=0.02, old_decay_rate=0.001,
                           old_decay_max=0.3, sample_with_old_after=500)


def needs_old_forward(cfg: ObjectiveConfig) -> bool:
    return cfg.dgpo_clip_range > 0


def needs_reference(cfg: ObjectiveConfig) -> bool:
    return True  # the preference is on errors relative to the reference


def dgpo_loss(dsm: torch.Tensor, dsm_ref: torch.Tensor, adv: torch.Tensor, group: torch.Tensor,
              beta: float) -> torch.Tensor:
    """DGPO's group preference, summed over groups, scaled so its gradient is the official code's.

    Per group g of size G: ``softplus(beta / G * sum_i A_i (dsm_i - dsm_ref_i)) * G / beta``, i.e.
    ``-log sigmoid`` of the reward-weighted gap by which the group's better samples (A > 0) beat its
    worse ones (A < 0) in denoising error relative to the reference, times ``G / beta``. Its gradient,
    ``sigmoid(.) * sum_i A_i grad dsm_i``, is exactly that of the official
    ``sum_i sigmoid(.).detach() * A_i * dsm_i``. Divide by the number of samples for the mean.
    """
    uniq, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    term = adv * (dsm - dsm_ref.detach())
    sums = torch.zeros(uniq.numel(), dtype=term.dtype, device=term.device).index_add(0, inv, term)
    g = counts.to(term.dtype)
    return (F.softplus(beta * sums / g) * g / beta).sum()


def dgpo_clip_mask(dsm: torch.Tensor, dsm_old: torch.Tensor, adv: torch.Tensor, clip_range: float
                   ) -> torch.Tensor:
    """DGPO's ``clip_dsm``: ``r = exp(dsm_old - dsm)`` outside ``1 +- eps`` in the advantage's direction."""
    ratio = torch.exp(dsm_old - dsm.detach())
    return torch.where(adv > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)


def whole_groups(finite: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``finite`` with every member of a group that has a non-finite member dropped (the group's preference is
    undefined)."""
    bad = torch.unique(group[~finite.cpu()])
    return finite & ~torch.isin(group, bad).to(finite.device)


def calls(n_unit: int, max_batch: int) -> int:
    """A unit split over several calls is evaluated twice (coefficients first, then the gradients)."""
    return one_call_per_part(n_unit, max_batch) * (2 if n_unit > max_batch else 1)


def train_unit(u, unit, eps_u, t_val) -> None:
    parts = u.parts(unit.numel())
    if len(parts) > 1:
        _train_split_group(u, unit, eps_u, t_val, parts)
        return
    cfg, gu = u.cfg, u.group[unit]
    u.tick()
    part = u.part(unit, parts[0], eps_u, t_val)
    a = u.adv[part.idx].to(u.device)
    v_old, v_ref = u.side_forwards(part)
    v = part.call()
    u.stats["nfe_train"] += part.x0.shape[0]
    dsm = mean_per_sample((part.target - v) ** 2)
    dsm_ref = mean_per_sample((part.target - v_ref) ** 2)
    if cfg.dgpo_clip_range > 0 and v_old is not None:
        clip = dgpo_clip_mask(dsm, mean_per_sample((part.target - v_old) ** 2), a, cfg.dgpo_clip_range)
        u.stats["clipfrac"] += float(clip.float().sum())
        dsm = torch.where(clip, dsm.detach(), dsm)
    kl = velocity_kl(v, v_ref) if cfg.kl_beta > 0 and v_ref is not None else None
    gc = gu[part.rows]
    finite = whole_groups(torch.isfinite(dsm.detach()) & torch.isfinite(dsm_ref), gc)
    total = dgpo_loss(dsm[finite], dsm_ref[finite], a[finite], gc.to(u.device)[finite], cfg.dpo_beta) \
        if finite.any() else dsm.sum() * 0.0
    if kl is not None:
        total = total + cfg.kl_beta * kl[finite].sum()
    u.record(total, finite, kl)


def _train_split_group(u, unit, eps_u, t_val, parts) -> None:
    """A unit larger than one call: pass 1 without gradients gets every member's errors, hence the group sums and
    each member's exact coefficient ``d loss / d dsm_i``; pass 2 backpropagates ``sum_i coef_i * dsm_i`` in calls
    of ``max_train_batch`` rows (one extra forward per sample, counted in ``nfe_train``)."""
    cfg, gu = u.cfg, u.group[unit]
    dsm_all, ref_all, clip_all, vref_all = [], [], [], []
    for rows in parts:
        u.tick()
        part = u.part(unit, rows, eps_u, t_val)
        v_old, v_ref = u.side_forwards(part)
        with torch.no_grad():
            v = part.call()
        u.stats["nfe_train"] += part.x0.shape[0]
        dsm = mean_per_sample((part.target - v) ** 2)
        dsm_all.append(dsm)
        ref_all.append(mean_per_sample((part.target - v_ref) ** 2))
        vref_all.append(v_ref if cfg.kl_beta > 0 else None)  # kept only for the KL term
        if cfg.dgpo_clip_range > 0 and v_old is not None:
            clip_all.append(dgpo_clip_mask(dsm, mean_per_sample((part.target - v_old) ** 2),
                                           u.adv[part.idx].to(u.device), cfg.dgpo_clip_range))
        else:
            clip_all.append(torch.zeros_like(dsm, dtype=torch.bool))
    dsm_u, ref_u, clip_u = torch.cat(dsm_all), torch.cat(ref_all), torch.cat(clip_all)
    a_u = u.adv[unit].to(u.device)
    u.stats["clipfrac"] += float(clip_u.float().sum())
    finite = whole_groups(torch.isfinite(dsm_u) & torch.isfinite(ref_u), gu)
    leaf = dsm_u.detach().clone().requires_grad_(True)
    if finite.any():
        total = dgpo_loss(leaf[finite], ref_u[finite], a_u[finite], gu.to(u.device)[finite], cfg.dpo_beta)
        coef = torch.autograd.grad(total, leaf)[0]
    else:
        total, coef = dsm_u.sum() * 0.0, torch.zeros_like(dsm_u)
    coef = torch.where(finite & ~clip_u, coef, torch.zeros_like(coef))
    kl_sum = 0.0
    for k, rows in enumerate(parts):
        u.tick()
        part = u.part(unit, rows, eps_u, t_val)
        v = part.call()
        u.stats["nfe_train"] += part.x0.shape[0]
        dsm = mean_per_sample((part.target - v) ** 2)
        sl = slice(int(rows[0]), int(rows[-1]) + 1)
        surrogate = (coef[sl] * dsm).sum()
        if cfg.kl_beta > 0:
            kl = velocity_kl(v, vref_all[k])
            fin = finite[sl]
            surrogate = surrogate + cfg.kl_beta * kl[fin].sum()
            kl_sum += float(kl.detach()[fin].sum())
        if finite[sl].any():
            (surrogate / u.denom).backward()
    u.stats["loss"] += float(total.detach()) + cfg.kl_beta * kl_sum
    u.stats["kl"] += kl_sum
    u.stats["edges_skipped_nonfinite"] += int((~finite).sum())
    u.stats["edges_trained"] += int(finite.sum())
