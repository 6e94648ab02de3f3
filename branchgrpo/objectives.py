"""Forward-process objectives: train on the final clean samples of a rollout, re-noised (docs/methods.md).

The PPO-clip update of :mod:`branchgrpo.loss` trains the SDE edges of a rollout through their
Gaussian log-probabilities. The objectives here need no log-probability: they take the clean samples
``x0`` a rollout produced (the tree's leaves, or a flat group's trajectories, SDE or ODE), their
advantages and their groups, re-noise ``x0`` at a few timesteps of the rollout's sigma schedule,
``x_t = (1 - t) x0 + t eps``, and score the model's velocity against the flow-matching target
``eps - x0``. So any sampler can feed any of them: the trainer picks the two independently.

* ``diffusionnft`` (DiffusionNFT): implicit positive / negative policies
  ``v+ = b v + (1 - b) v_old`` and ``v- = (1 + b) v_old - b v``, their x0 errors weighted by the
  advantage mapped to ``[0, 1]``; ``v_old`` is an exponential moving average of the adapter.
* ``awm`` (Advantage Weighted Matching): the negative (weighted) flow-matching error as the
  log-likelihood inside a PPO ratio with clipping and the group advantage.
* ``dgpo`` (DGPO): a DPO-style preference of each group's better samples over its worse ones, on
  denoising errors relative to the reference model.

Each loss is a pure function of tensors (tested against hand computations and ``gradcheck``);
:func:`forward_update` runs the model around them and steps the optimizer once per iteration.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.nn.functional as F

from .schedule import BranchSchedule
from .sde import quantize_timestep

OBJECTIVES = ("ppo", "diffusionnft", "awm", "dgpo")
"""``ppo``: the SDE-edge PPO-clip update of :mod:`branchgrpo.loss`; the others: this module."""


@dataclass
class ObjectiveConfig:
    name: str = "ppo"
    """``"ppo"`` (SDE edges, :mod:`branchgrpo.loss`), ``"diffusionnft"``, ``"awm"`` or ``"dgpo"``."""
    train_timesteps: int = 4
    """Re-noising timesteps per sample and iteration (NFT: 9 of 10, AWM: 6, DGPO: 4)."""
    first_step: int = 0
    """Timesteps are drawn from the rollout's step indices ``[first_step, last)`` (AWM: 1)."""
    timestep_fraction: float = 1.0
    """``last = max(first_step + 1, int(num_steps * timestep_fraction))`` (NFT 0.99, AWM 0.9)."""
    timestep_sampling: str = "subset"
    """``"subset"``: a random subset of the candidates (NFT, DGPO); ``"stratified"``: one random index
    from each of ``train_timesteps`` equal strata (AWM)."""
    shared_noise: bool = False
    """One re-noising noise per group and timestep (DGPO) instead of one per sample."""
    adv_clip: float = 5.0
    """Advantages are clamped to ``[-adv_clip, adv_clip]`` (``adv_clip_max``)."""
    kl_beta: float = 0.0
    """Weight of ``mean((v - v_ref)^2)`` to the reference (adapter disabled); 0 skips that forward."""
    nft_beta: float = 1.0
    """DiffusionNFT's ``beta`` (1.0; 0.1 for OCR)."""
    awm_weighting: str = "ghuber"
    """AWM's log-likelihood surrogate: ``"uniform"`` ``-mse``, ``"t"`` ``-t*mse`` or ``"ghuber"``."""
    ghuber_power: float = 0.25
    awm_adv_max: float = 1.0
    """AWM rescales the clipped advantage to ``[-awm_adv_max, awm_adv_max]``."""
    awm_clip_range: float = 1.0
    """AWM's PPO ratio clip (1.0 in every official config)."""
    old_kl_beta: float = 0.0
    """AWM's ``ema_beta``: weight of ``mean((v - v_old)^2)`` to the EMA policy (1.0 in its configs)."""
    dpo_beta: float = 100.0
    """DGPO's ``beta_dpo``."""
    dgpo_clip_range: float = 1e-3
    """DGPO's clip of the denoising loss against the EMA policy (``clip_dsm``); 0 turns it off."""
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    old_decay_flat: int = 0
    """EMA of the old policy after each optimizer step ``n``: ``decay = 0`` for ``n < flat``, else
    ``min((n - flat) * rate, max)``; ``old = decay * old + (1 - decay) * current``."""
    sample_with_old_after: int = -1
    """Roll out with the old (EMA) policy from this iteration on (NFT 0, DGPO 200); -1: never."""

    def validate(self, where: str = "ObjectiveConfig") -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{where}: {name} {msg} (got {getattr(self, name)!r}).")

        if self.name not in OBJECTIVES:
            raise bad("name", f"must be one of {OBJECTIVES}")
        if self.timestep_sampling not in ("subset", "stratified"):
            raise bad("timestep_sampling", "must be 'subset' or 'stratified'")
        if self.awm_weighting not in ("uniform", "t", "ghuber"):
            raise bad("awm_weighting", "must be 'uniform', 't' or 'ghuber'")
        checks = [
            ("train_timesteps", isinstance(self.train_timesteps, int) and self.train_timesteps >= 1,
             "must be an integer >= 1"),
            ("first_step", isinstance(self.first_step, int) and self.first_step >= 0, "must be an integer >= 0"),
            ("timestep_fraction", 0 < self.timestep_fraction <= 1, "must be in (0, 1]"),
            ("adv_clip", self.adv_clip > 0, "must be > 0"),
            ("kl_beta", self.kl_beta >= 0, "must be >= 0"),
            ("nft_beta", self.nft_beta > 0, "must be > 0"),
            ("ghuber_power", self.ghuber_power > 0, "must be > 0"),
            ("awm_adv_max", self.awm_adv_max > 0, "must be > 0"),
            ("awm_clip_range", self.awm_clip_range > 0, "must be > 0"),
            ("old_kl_beta", self.old_kl_beta >= 0, "must be >= 0"),
            ("dpo_beta", self.dpo_beta > 0, "must be > 0"),
            ("dgpo_clip_range", self.dgpo_clip_range >= 0, "must be >= 0 (0 = no clip)"),
            ("old_decay_rate", self.old_decay_rate >= 0, "must be >= 0"),
            ("old_decay_max", 0 <= self.old_decay_max < 1, "must be in [0, 1)"),
            ("old_decay_flat", self.old_decay_flat >= 0, "must be >= 0"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise bad(name, msg)

    @property
    def forward_process(self) -> bool:
        return self.name != "ppo"

    def needs_old_forward(self) -> bool:
        """Whether the loss evaluates the old (EMA) policy."""
        return (self.name == "diffusionnft" or (self.name == "awm" and self.old_kl_beta > 0)
                or (self.name == "dgpo" and self.dgpo_clip_range > 0))

    def needs_old(self) -> bool:
        """Whether the trainer keeps an old (EMA) policy."""
        return self.forward_process and (self.needs_old_forward() or self.sample_with_old_after >= 0)

    def needs_reference(self) -> bool:
        return self.kl_beta > 0 or self.name == "dgpo"


# ------------------------------------------------------------------------------ pure losses ---
def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


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
            w_pos = _mean((x0_pos - x0).abs()).clamp_min(1e-5)
            w_neg = _mean((x0_neg - x0).abs()).clamp_min(1e-5)
    else:
        w_pos, w_neg = weights
    loss_pos = _mean((x0_pos - x0) ** 2) / w_pos
    loss_neg = _mean((x0_neg - x0) ** 2) / w_neg
    return adv_clip * (r * loss_pos + (1.0 - r) * loss_neg) / beta


def awm_logprob(v: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber",
                power: float = 0.25) -> torch.Tensor:
    """AWM's log-likelihood surrogate per sample: ``-mse(v, eps - x0)``, optionally weighted.

    ``"t"``: ``-t * mse``; ``"ghuber"``: ``-t * ((mse + 1e-10)^p - (1e-10)^p) / p``.
    """
    mse = _mean((v - target) ** 2)
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


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """``mean((v - v_ref)^2)`` per sample (the three methods' KL surrogate)."""
    return _mean((v - v_ref.detach()) ** 2)


# ------------------------------------------------------------------------------ old policy ---
def old_decay(step: int, rate: float, cap: float, flat: int = 0) -> float:
    return 0.0 if step < flat else min((step - flat) * rate, cap)


class EMAPolicy:
    """A moving-average copy of the adapter's trainable parameters, swapped in by :meth:`active`."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for p, s in zip(self.params, self.shadow):
            s.mul_(decay).add_(p.detach().to(s.dtype), alpha=1.0 - decay)

    def state_dict(self) -> list[torch.Tensor]:
        return [s.detach().cpu() for s in self.shadow]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"old policy state has {len(state)} tensors, the adapter {len(self.shadow)}")
        with torch.no_grad():
            for s, v in zip(self.shadow, state):
                s.copy_(v)


# ------------------------------------------------------------------------------ the update ---
def timestep_candidates(schedule: BranchSchedule, cfg: ObjectiveConfig) -> range:
    """The step indices the re-noising timesteps are drawn from: ``[first_step, num_steps * timestep_fraction)``;
    at most ``len()`` of them are used per image, whatever ``train_timesteps`` asks."""
    lo = min(cfg.first_step, schedule.num_steps - 1)
    hi = max(lo + 1, min(schedule.num_steps, int(schedule.num_steps * cfg.timestep_fraction)))
    return range(lo, hi)


def pick_timesteps(schedule: BranchSchedule, cfg: ObjectiveConfig, generator: torch.Generator) -> list[int]:
    """Step indices of the rollout's schedule whose sigmas are the re-noising timesteps."""
    cand = timestep_candidates(schedule, cfg)
    lo, hi = cand.start, cand.stop
    cand = list(cand)
    n = min(cfg.train_timesteps, len(cand))
    if cfg.timestep_sampling == "stratified":
        bounds = torch.linspace(lo, hi, n + 1)
        u = torch.rand(n, generator=generator)
        out = [int(b0 + u_i * (b1 - b0)) for b0, b1, u_i in zip(bounds[:-1].tolist(), bounds[1:].tolist(), u.tolist())]
        return [min(max(o, lo), hi - 1) for o in out]
    perm = torch.randperm(len(cand), generator=generator)[:n]
    return [cand[i] for i in perm.tolist()]


def _chunks(group: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
    """Sample indices in chunks of whole groups (at least one group, at most ``max_batch`` otherwise)."""
    out, cur = [], []
    for g in torch.unique(group).tolist():
        members = torch.nonzero(group == g).flatten().tolist()
        if cur and len(cur) + len(members) > max_batch:
            out.append(torch.tensor(cur))
            cur = []
        cur += members
    if cur:
        out.append(torch.tensor(cur))
    return out


def _whole_groups(finite: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``finite`` with every member of a group that has a non-finite member dropped (DGPO: the group's preference
    is undefined)."""
    bad = torch.unique(group[~finite.cpu()])
    return finite & ~torch.isin(group, bad).to(finite.device)


def forward_update(model: Any, cond: Any, x0: torch.Tensor, index: torch.Tensor, adv: torch.Tensor,
                   group: torch.Tensor, schedule: BranchSchedule, cfg: ObjectiveConfig, optim: Any,
                   optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *,
                   generator: torch.Generator, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None,
                   reference: Callable[[], ContextManager] | None = None,
                   old_policy: EMAPolicy | None = None, hook: Callable | None = None,
                   dist: Any = None) -> dict[str, float]:
    """One optimizer step of a forward-process objective on the clean samples ``x0`` ``[N, ...]``.

    ``index``: the conditioning row of each sample; ``adv``: its advantage; ``group``: its group
    (the prompt). The loss is the mean over samples and timesteps (DGPO: its group form divided by
    the number of samples). A sample whose loss is not finite is dropped before the backward.

    Samples are taken in units of whole groups (noise shared per group is drawn per unit), and a unit
    goes through the model in calls of at most ``optim.max_train_batch`` rows, so the update's memory is
    that of ``max_train_batch`` whatever the group size. NFT and AWM are sums of per-sample terms. DGPO's
    term couples a group (``softplus`` of a sum over it): a group larger than ``max_train_batch`` is
    evaluated twice, first without gradients to get every member's denoising error and from them each
    member's exact coefficient ``d loss / d dsm_i``, then in ``max_train_batch`` calls with gradients,
    backpropagating ``sum_i coef_i * dsm_i`` (one extra forward per sample, counted in ``nfe_train``).
    """
    params = [p for p in params if p.requires_grad]
    device = torch.device(device)
    stats = {"loss": 0.0, "kl": 0.0, "grad_norm": 0.0, "optimizer_steps": 0, "optimizer_steps_skipped": 0,
             "nfe_train": 0, "edges_trained": 0, "edges_skipped_nonfinite": 0, "clipfrac": 0.0,
             "train_timesteps": 0}
    n_local = x0.shape[0]
    steps = pick_timesteps(schedule, cfg, generator)
    stats["train_timesteps"] = len(steps)
    n_total = n_local if dist is None else max(1.0, dist.all_reduce_sum(n_local))
    denom = n_total * len(steps)
    sigmas = schedule.sigmas()
    adv = adv.float().clamp(-cfg.adv_clip, cfg.adv_clip)
    max_batch = max(1, optim.max_train_batch)
    units = _chunks(group, max_batch)
    calls_per_step = sum(-(-u.numel() // max_batch) * (2 if cfg.name == "dgpo" and u.numel() > max_batch else 1)
                         for u in units)
    total_calls, done = len(steps) * calls_per_step, 0
    optimizer.zero_grad(set_to_none=True)
    for step in steps:
        t_val = float(sigmas[step])
        for unit in units:
            gu = group[unit]
            n_unit = unit.numel()
            if cfg.shared_noise:
                uniq, inv = torch.unique(gu, return_inverse=True)
                eps_u = torch.randn((uniq.numel(), *x0.shape[1:]), generator=generator)[inv]
            else:
                eps_u = torch.randn((n_unit, *x0.shape[1:]), generator=generator)
            parts = [torch.arange(i, min(i + max_batch, n_unit)) for i in range(0, n_unit, max_batch)]

            def inputs(part: torch.Tensor):
                idx = unit[part]
                xc = x0[idx].to(device).float()
                eps = eps_u[part].to(device)
                t = torch.full((xc.shape[0],), t_val, dtype=torch.float32, device=device)
                xt = (1.0 - t_val) * xc + t_val * eps
                t_model = quantize_timestep(t, schedule.timestep_quantum) if schedule.timestep_quantum > 0 else t
                xin = xt if dtype is None else xt.to(dtype)
                ic = index[idx].to(device)
                return xc, eps, t, xt, (lambda: model.velocity(xin, t_model, cond, ic).float())

            def side_forwards(call: Callable[[], torch.Tensor], rows: int):
                v_old = v_ref = None
                with torch.no_grad():
                    if cfg.needs_old_forward() and old_policy is not None:
                        with old_policy.active():
                            v_old = call()
                        stats["nfe_train"] += rows
                    if cfg.needs_reference():
                        with (reference() if reference is not None else nullcontext()):
                            v_ref = call()
                        stats["nfe_train"] += rows
                return v_old, v_ref

            if cfg.name == "dgpo" and len(parts) > 1:
                # Pass 1, no gradients: every member's errors, hence the group sums and the exact coefficients.
                dsm_all, ref_all, clip_all, vref_all = [], [], [], []
                for part in parts:
                    if hook is not None:
                        hook("train", done, total_calls)
                    done += 1
                    xc, eps, t, xt, call = inputs(part)
                    v_old, v_ref = side_forwards(call, xc.shape[0])
                    with torch.no_grad():
                        v = call()
                    stats["nfe_train"] += xc.shape[0]
                    target = eps - xc
                    dsm = _mean((target - v) ** 2)
                    dsm_all.append(dsm)
                    ref_all.append(_mean((target - v_ref) ** 2))
                    vref_all.append(v_ref if cfg.kl_beta > 0 else None)  # kept only for the KL term
                    if cfg.dgpo_clip_range > 0 and v_old is not None:
                        clip_all.append(dgpo_clip_mask(dsm, _mean((target - v_old) ** 2), adv[unit[part]].to(device),
                                                       cfg.dgpo_clip_range))
                    else:
                        clip_all.append(torch.zeros_like(dsm, dtype=torch.bool))
                dsm_u, ref_u, clip_u = torch.cat(dsm_all), torch.cat(ref_all), torch.cat(clip_all)
                a_u = adv[unit].to(device)
                stats["clipfrac"] += float(clip_u.float().sum())
                finite = _whole_groups(torch.isfinite(dsm_u) & torch.isfinite(ref_u), gu)
                leaf = dsm_u.detach().clone().requires_grad_(True)
                g_dev = gu.to(device)
                if finite.any():
                    total = dgpo_loss(leaf[finite], ref_u[finite], a_u[finite], g_dev[finite], cfg.dpo_beta)
                    coef = torch.autograd.grad(total, leaf)[0]
                else:
                    total, coef = dsm_u.sum() * 0.0, torch.zeros_like(dsm_u)
                coef = torch.where(finite & ~clip_u, coef, torch.zeros_like(coef))
                kl_sum = 0.0
                # Pass 2, with gradients, max_train_batch rows per call.
                for k, part in enumerate(parts):
                    if hook is not None:
                        hook("train", done, total_calls)
                    done += 1
                    xc, eps, t, xt, call = inputs(part)
                    v = call()
                    stats["nfe_train"] += xc.shape[0]
                    dsm = _mean((eps - xc - v) ** 2)
                    sl = slice(int(part[0]), int(part[-1]) + 1)
                    surrogate = (coef[sl] * dsm).sum()
                    if cfg.kl_beta > 0:
                        kl = velocity_kl(v, vref_all[k])
                        fin = finite[sl]
                        surrogate = surrogate + cfg.kl_beta * kl[fin].sum()
                        kl_sum += float(kl.detach()[fin].sum())
                    if finite[sl].any():
                        (surrogate / denom).backward()
                stats["loss"] += float(total.detach()) + cfg.kl_beta * kl_sum
                stats["kl"] += kl_sum
                stats["edges_skipped_nonfinite"] += int((~finite).sum())
                stats["edges_trained"] += int(finite.sum())
                continue

            for part in parts:
                if hook is not None:
                    hook("train", done, total_calls)
                done += 1
                xc, eps, t, xt, call = inputs(part)
                gc = gu[part]
                a = adv[unit[part]].to(device)
                target = eps - xc
                v_old, v_ref = side_forwards(call, xc.shape[0])
                v = call()
                stats["nfe_train"] += xc.shape[0]
                if cfg.name == "diffusionnft":
                    vo = v_old if v_old is not None else v.detach()
                    r = nft_reward_weight(a, cfg.adv_clip)
                    per = nft_loss(v, vo, xt, xc, t, r, cfg.nft_beta, cfg.adv_clip)
                elif cfg.name == "awm":
                    logp = awm_logprob(v, target, t, cfg.awm_weighting, cfg.ghuber_power)
                    a_awm = a / cfg.adv_clip * cfg.awm_adv_max
                    # On-policy: the old log-likelihood is the current one, detached (ratio 1, gradient -A grad logp).
                    per = awm_loss(logp, logp.detach(), a_awm, cfg.awm_clip_range)
                    if cfg.old_kl_beta > 0 and v_old is not None:
                        per = per + cfg.old_kl_beta * velocity_kl(v, v_old)
                else:  # dgpo, whole groups in this call
                    dsm = _mean((target - v) ** 2)
                    dsm_ref = _mean((target - v_ref) ** 2)
                    if cfg.dgpo_clip_range > 0 and v_old is not None:
                        clip = dgpo_clip_mask(dsm, _mean((target - v_old) ** 2), a, cfg.dgpo_clip_range)
                        stats["clipfrac"] += float(clip.float().sum())
                        dsm = torch.where(clip, dsm.detach(), dsm)
                    per = None
                kl = velocity_kl(v, v_ref) if cfg.kl_beta > 0 and v_ref is not None else None
                if per is not None:
                    if kl is not None:
                        per = per + cfg.kl_beta * kl
                    finite = torch.isfinite(per.detach())
                    total = per[finite].sum()
                else:
                    finite = _whole_groups(torch.isfinite(dsm.detach()) & torch.isfinite(dsm_ref), gc)
                    total = dgpo_loss(dsm[finite], dsm_ref[finite], a[finite], gc.to(device)[finite], cfg.dpo_beta) \
                        if finite.any() else dsm.sum() * 0.0
                    if kl is not None:
                        total = total + cfg.kl_beta * kl[finite].sum()
                stats["edges_skipped_nonfinite"] += int((~finite).sum())
                if finite.any():
                    (total / denom).backward()
                stats["loss"] += float(total.detach())
                if kl is not None:
                    stats["kl"] += float(kl.detach()[finite].sum())
                stats["edges_trained"] += int(finite.sum())
    if dist is not None:
        dist.all_reduce_grads(params)
    gn = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
    if math.isfinite(float(gn)):
        optimizer.step()
        stats["optimizer_steps"] += 1
        stats["grad_norm"] = float(gn)
    else:
        stats["optimizer_steps_skipped"] += 1
    optimizer.zero_grad(set_to_none=True)
    n = max(1, stats["edges_trained"])
    for key in ("loss", "kl", "clipfrac"):
        stats[key] /= n
    return stats
