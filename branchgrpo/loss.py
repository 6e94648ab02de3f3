"""The policy update (SPEC §5): recompute the kept edges with gradients, PPO-clip, optional KL.

Kept edges are grouped by parent. One forward of a parent gives the mean of all its kept children,
so the K children of a fork cost one model evaluation, not K. Parent groups are shuffled and cut into
optimizer-step minibatches (siblings never straddle two steps), and each minibatch is evaluated in
chunks of at most ``max_train_batch`` parents whose gradients accumulate.

Optimizer-step policy (``edges_per_step``):

* ``0`` (default): one optimizer step per iteration, over every kept edge of the batch of trees.
  Every ratio is exactly on-policy, the gradient averages all edges (lowest variance), and the
  number of updates does not change when pruning changes the number of kept edges, so the pruned
  presets are compared to the unpruned ones at equal optimisation, not at fewer updates.
* ``N > 0``: a step every N edges, the official BranchGRPO code's policy (N = 12, which makes ~36
  AdamW steps per iteration on 2 trees). Later minibatches are slightly off-policy; that is where
  the PPO clip acts.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch

from .schedule import BranchSchedule
from .sde import gaussian_kl, gaussian_logprob, quantize_timestep, step_distribution
from .tree import ModelCallHook, Tree


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-3
    """PPO ratio clip epsilon (BranchGRPO 1e-3; DanceGRPO / MixGRPO 1e-4)."""
    kl_beta: float = 0.0
    """Weight of the closed-form KL to the reference policy (adapter disabled). 0 skips the extra forward."""
    edges_per_step: int = 0
    """0: one optimizer step per iteration; N: a step every N edges (see module doc)."""
    max_train_batch: int = 8
    """Parents per forward-with-gradient (bounds activation memory)."""
    noise_weighting: bool = False
    """Weight each edge's loss by its step's noise std over the mean std of the schedule's steps
    (TempFlow-GRPO's noise-aware weighting: more weight where the SDE explores more)."""

    def validate(self, where: str = "OptimConfig") -> None:
        for name in ("learning_rate", "max_grad_norm", "clip_range", "kl_beta", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be a finite number (got {value!r}).")
        checks = [
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
            ("clip_range", 0 < self.clip_range < 1, "must be in (0, 1)"),
            ("kl_beta", self.kl_beta >= 0, "must be >= 0"),
            ("edges_per_step", self.edges_per_step >= 0, "must be >= 0 (0 = one step per iteration)"),
            ("max_train_batch", self.max_train_batch >= 1, "must be >= 1"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{where}: {name} {msg} (got {getattr(self, name)!r}).")


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                  clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-edge ``max(-A * r, -A * clip(r, 1-eps, 1+eps))``; returns (loss, ratio, clipped mask)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    return loss, ratio, (clipped > unclipped).detach()


def finite_edges(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Edges whose ratio ``exp(new - old)`` and advantage are finite (checked without gradients).

    A non-finite edge must be removed from the graph *before* ``exp``: masking its loss afterwards
    still back-propagates ``0 * inf = NaN`` through ``exp`` into the shared parameters (and a clipped
    ``-A * clip(inf)`` is even a finite loss with a NaN gradient)."""
    with torch.no_grad():
        ratio = torch.exp(logp_new.detach().float() - logp_old.float())
        return torch.isfinite(ratio) & torch.isfinite(adv)


def plan_minibatches(parents: torch.Tensor, counts: torch.Tensor, edges_per_step: int,
                     generator: torch.Generator | None) -> list[torch.Tensor]:
    """Shuffle parent groups and cut them into optimizer steps of about ``edges_per_step`` edges."""
    order = torch.randperm(parents.numel(), generator=generator)
    parents, counts = parents[order], counts[order]
    if edges_per_step <= 0:
        return [parents]
    out, start, acc = [], 0, 0
    for i, c in enumerate(counts.tolist()):
        acc += c
        if acc >= edges_per_step:
            out.append(parents[start:i + 1])
            start, acc = i + 1, 0
    if start < parents.numel():
        out.append(parents[start:])
    return out


def policy_update(model: Any, cond: Any, tree: Tree, edges: torch.Tensor, advantages: torch.Tensor,
                  schedule: BranchSchedule, cfg: OptimConfig, optimizer: torch.optim.Optimizer,
                  params: Iterable[torch.Tensor], *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  reference: Callable[[], ContextManager] | None = None,
                  hook: ModelCallHook | None = None, dist: Any = None) -> dict[str, float]:
    """Train on the kept ``edges`` (child node ids). Returns update metrics.

    ``dist`` (see :mod:`branchgrpo.distributed`) makes the loss of a minibatch the mean over the
    edges of every rank and all-reduces the adapter gradients before clipping and stepping.
    """
    params = [p for p in params if p.requires_grad]
    device = torch.device(device)
    stats = {"loss": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0, "ratio_max_dev": 0.0, "approx_kl": 0.0,
             "kl": 0.0, "grad_norm": 0.0, "optimizer_steps": 0, "nfe_train": 0, "edges_trained": 0,
             "edges_skipped_nonfinite": 0, "optimizer_steps_skipped": 0}
    if edges.numel() == 0 and dist is None:
        return stats
    sigmas = tree.sigmas
    sigma_one = float(sigmas[1]) if tree.num_steps > 1 else None
    step_weight = None
    if cfg.noise_weighting:
        s_all = sigmas[:-1].float()
        _, std_all = step_distribution(torch.zeros(tree.num_steps, 1), torch.zeros(tree.num_steps, 1), s_all,
                                       sigmas[1:].float(), schedule.sde, schedule.eta, sigma_one)
        step_weight = (std_all.flatten() / std_all.mean()).to(device)
    edge_parent = tree.parent[edges]
    uniq, counts = torch.unique(edge_parent, return_counts=True)
    adv_all = advantages.float()
    total_parents = uniq.numel()
    done_parents = 0
    grad_norms = []
    for mb in plan_minibatches(uniq, counts, cfg.edges_per_step, generator):
        mb_edges = edges[torch.isin(edge_parent, mb)]
        n_mb = mb_edges.numel() if dist is None else max(1.0, dist.all_reduce_sum(mb_edges.numel()))
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, mb.numel(), cfg.max_train_batch):
            par = mb[start:start + cfg.max_train_batch].sort().values
            kids = mb_edges[torch.isin(tree.parent[mb_edges], par)]
            pos = torch.searchsorted(par, tree.parent[kids])
            if hook is not None:
                hook("train", done_parents, total_parents)
            step = tree.depth[par]  # a node at depth d is denoised by step d
            s = sigmas[step].float()
            s_next = sigmas[step + 1].float()
            s_model = quantize_timestep(s, schedule.timestep_quantum) if schedule.timestep_quantum > 0 else s
            x = tree.latents[par].to(device)
            idx = tree.tree[par].to(device)
            xin = x if dtype is None else x.to(dtype)
            v = model.velocity(xin, s_model.to(device), cond, idx).float()
            mean, std = step_distribution(x, v, s.to(device), s_next.to(device), schedule.sde,
                                          schedule.eta, sigma_one)
            pos_d = pos.to(device)
            mean_k, std_k = mean[pos_d], std[pos_d]
            if schedule.split_logprob == "exact":
                fork = tree.is_fork[kids].to(device).view((-1,) + (1,) * (x.dim() - 1))
                std_k = torch.where(fork, std_k * schedule.split_noise_scale, std_k)
            child = tree.latents[kids].to(device)
            logp = gaussian_logprob(child, mean_k, std_k)
            old = tree.logprob[kids].to(device)
            adv = adv_all[kids].to(device)
            finite = finite_edges(logp, old, adv)
            # Dropped edges get ratio 1 and advantage 0 on their inputs, so nothing non-finite enters the graph.
            logp = torch.where(finite, logp, old.detach())
            adv = torch.where(finite, adv, torch.zeros_like(adv))
            loss, ratio, clipped = ppo_clip_loss(logp, old, adv, cfg.clip_range)
            if step_weight is not None:
                loss = loss * step_weight[tree.depth[kids].to(device) - 1]
            if cfg.kl_beta > 0:
                with torch.no_grad(), (reference() if reference is not None else nullcontext()):
                    v_ref = model.velocity(xin, s_model.to(device), cond, idx).float()
                mean_ref, _ = step_distribution(x, v_ref, s.to(device), s_next.to(device), schedule.sde,
                                                schedule.eta, sigma_one)
                kl = gaussian_kl(mean_k, mean_ref[pos_d], std_k)
                finite = finite & torch.isfinite(kl.detach())
                kl = torch.where(finite, kl, torch.zeros_like(kl))
                loss = loss + cfg.kl_beta * kl
                stats["kl"] += float(kl.detach().sum())
                stats["nfe_train"] += par.numel()
            finite = finite & torch.isfinite(loss.detach())
            stats["edges_skipped_nonfinite"] += int((~finite).sum())
            if finite.any():
                (loss[finite].sum() / n_mb).backward()
            stats["nfe_train"] += par.numel()
            stats["loss"] += float(loss[finite].detach().sum())
            stats["clipfrac"] += float(clipped[finite].float().sum())
            stats["ratio_mean"] += float(ratio[finite].detach().sum())
            if finite.any():
                stats["ratio_max_dev"] = max(stats["ratio_max_dev"],
                                             float((ratio.detach()[finite] - 1).abs().max()))
            stats["approx_kl"] += float((old - logp.detach())[finite].sum())
            stats["edges_trained"] += int(finite.sum())
            done_parents += par.numel()
        if dist is not None:
            dist.all_reduce_grads(params)
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if math.isfinite(float(gn)):
            optimizer.step()
            grad_norms.append(float(gn))
            stats["optimizer_steps"] += 1
        else:
            stats["optimizer_steps_skipped"] += 1
    optimizer.zero_grad(set_to_none=True)
    n = max(1, stats["edges_trained"])
    for key in ("loss", "clipfrac", "ratio_mean", "approx_kl", "kl"):
        stats[key] /= n
    stats["grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
    return stats
