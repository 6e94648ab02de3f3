"""What the forward-process objectives share: the old (EMA) policy, the re-noising timesteps, and the update loop.

:func:`forward_update` takes one optimizer step on a rollout's clean samples. It draws the timesteps and the
noise, cuts the samples into units of whole groups and the units into model calls of at most
``max_train_batch`` rows, and hands each unit to the objective's ``train_unit`` (one per method module). A
method whose loss is a sum of per-sample terms uses :func:`train_per_sample` with its own ``sample_loss``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch

from ..schedule import BranchSchedule
from ..sde import quantize_timestep
from .config import ObjectiveConfig


def mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """``mean((v - v_ref)^2)`` per sample (the three methods' KL surrogate)."""
    return mean_per_sample((v - v_ref.detach()) ** 2)


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


# ------------------------------------------------------------------------------ timesteps ---
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


# ------------------------------------------------------------------------------ the update ---
def chunks_of_groups(group: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
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


@dataclass
class Part:
    """One model call's rows of a unit: clean samples, noise, timestep, noised input, and the velocity call."""
    rows: torch.Tensor  # positions in the unit
    idx: torch.Tensor  # sample indices
    x0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    xt: torch.Tensor
    call: Callable[[], torch.Tensor]

    @property
    def target(self) -> torch.Tensor:
        return self.eps - self.x0


@dataclass
class Update:
    """The state of one :func:`forward_update`: inputs, the running statistics and the progress counter."""
    model: Any
    cond: Any
    x0: torch.Tensor
    index: torch.Tensor
    adv: torch.Tensor
    group: torch.Tensor
    schedule: BranchSchedule
    cfg: ObjectiveConfig
    device: torch.device
    dtype: torch.dtype | None
    max_batch: int
    denom: float
    reference: Callable[[], ContextManager] | None
    old_policy: Any
    hook: Callable | None
    total_calls: int = 0
    done: int = 0
    stats: dict = field(default_factory=dict)

    def tick(self) -> None:
        if self.hook is not None:
            self.hook("train", self.done, self.total_calls)
        self.done += 1

    def part(self, unit: torch.Tensor, rows: torch.Tensor, eps_u: torch.Tensor, t_val: float) -> Part:
        idx = unit[rows]
        xc = self.x0[idx].to(self.device).float()
        eps = eps_u[rows].to(self.device)
        t = torch.full((xc.shape[0],), t_val, dtype=torch.float32, device=self.device)
        xt = (1.0 - t_val) * xc + t_val * eps
        q = self.schedule.timestep_quantum
        t_model = quantize_timestep(t, q) if q > 0 else t
        xin = xt if self.dtype is None else xt.to(self.dtype)
        ic = self.index[idx].to(self.device)
        return Part(rows, idx, xc, eps, t, xt, lambda: self.model.velocity(xin, t_model, self.cond, ic).float())

    def side_forwards(self, part: Part) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The old policy's and the reference's velocities, without gradients, where the objective needs them."""
        v_old = v_ref = None
        rows = part.x0.shape[0]
        with torch.no_grad():
            if self.cfg.needs_old_forward() and self.old_policy is not None:
                with self.old_policy.active():
                    v_old = part.call()
                self.stats["nfe_train"] += rows
            if self.cfg.needs_reference():
                with (self.reference() if self.reference is not None else nullcontext()):
                    v_ref = part.call()
                self.stats["nfe_train"] += rows
        return v_old, v_ref

    def parts(self, n_unit: int) -> list[torch.Tensor]:
        return [torch.arange(i, min(i + self.max_batch, n_unit)) for i in range(0, n_unit, self.max_batch)]

    def record(self, total: torch.Tensor, finite: torch.Tensor, kl: torch.Tensor | None) -> None:
        """Backward of one call's summed loss over the kept samples; loss, KL and sample counts."""
        self.stats["edges_skipped_nonfinite"] += int((~finite).sum())
        if finite.any():
            (total / self.denom).backward()
        self.stats["loss"] += float(total.detach())
        if kl is not None:
            self.stats["kl"] += float(kl.detach()[finite].sum())
        self.stats["edges_trained"] += int(finite.sum())


def train_per_sample(u: Update, unit: torch.Tensor, eps_u: torch.Tensor, t_val: float,
                     sample_loss: Callable[[Update, Part, torch.Tensor, Any, Any, torch.Tensor], torch.Tensor]) -> None:
    """A unit of a method whose loss is a sum of per-sample terms: ``sample_loss(u, part, v, v_old, v_ref, adv)``
    per call (plus the KL to the reference); a sample whose loss is not finite is dropped before the backward."""
    cfg = u.cfg
    for rows in u.parts(unit.numel()):
        u.tick()
        part = u.part(unit, rows, eps_u, t_val)
        a = u.adv[part.idx].to(u.device)
        v_old, v_ref = u.side_forwards(part)
        v = part.call()
        u.stats["nfe_train"] += part.x0.shape[0]
        per = sample_loss(u, part, v, v_old, v_ref, a)
        kl = velocity_kl(v, v_ref) if cfg.kl_beta > 0 and v_ref is not None else None
        if kl is not None:
            per = per + cfg.kl_beta * kl
        finite = torch.isfinite(per.detach())
        u.record(per[finite].sum(), finite, kl)


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
    that of ``max_train_batch`` whatever the group size. The objective's module trains each unit
    (``train_unit``) and says how many calls a unit costs (``calls``).
    """
    method = cfg.method
    params = [p for p in params if p.requires_grad]
    steps = pick_timesteps(schedule, cfg, generator)
    n_local = x0.shape[0]
    n_total = n_local if dist is None else max(1.0, dist.all_reduce_sum(n_local))
    max_batch = max(1, optim.max_train_batch)
    units = chunks_of_groups(group, max_batch)
    u = Update(model, cond, x0, index, adv.float().clamp(-cfg.adv_clip, cfg.adv_clip), group, schedule, cfg,
               torch.device(device), dtype, max_batch, n_total * len(steps), reference, old_policy, hook,
               stats={"loss": 0.0, "kl": 0.0, "grad_norm": 0.0, "optimizer_steps": 0, "optimizer_steps_skipped": 0,
                      "nfe_train": 0, "edges_trained": 0, "edges_skipped_nonfinite": 0, "clipfrac": 0.0,
                      "train_timesteps": len(steps)})
    u.total_calls = len(steps) * sum(method.calls(unit.numel(), max_batch) for unit in units)
    sigmas = schedule.sigmas()
    optimizer.zero_grad(set_to_none=True)
    for step in steps:
        t_val = float(sigmas[step])
        for unit in units:
            if cfg.shared_noise:
                uniq, inv = torch.unique(group[unit], return_inverse=True)
                eps_u = torch.randn((uniq.numel(), *x0.shape[1:]), generator=generator)[inv]
            else:
                eps_u = torch.randn((unit.numel(), *x0.shape[1:]), generator=generator)
            method.train_unit(u, unit, eps_u, t_val)
    stats = u.stats
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


def one_call_per_part(n_unit: int, max_batch: int) -> int:
    return -(-n_unit // max_batch)
