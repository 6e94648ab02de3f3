"""Which edges enter the backward pass (SPEC §4).

Pruning only removes edges from the update: the rollout, the rewards and the advantages (computed
on the full tree) are unchanged. Order, as in the official code: the Mix filter (only SDE edges can
be trained: an ODE edge has no density), depth pruning, width pruning. Two selections that the flat
baselines use are applied first and always: dropping the last step, and DanceGRPO's random
timestep fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .tree import Tree


@dataclass
class PruningConfig:
    depths: tuple[int, ...] = ()
    """Child depths whose edges are not trained (depth d = the edge of step d-1). E.g. (16,...,20)."""
    depth_slide: bool = False
    """Slide the pruned depths one shallower every ``depth_slide_interval`` iterations."""
    depth_slide_interval: int = 30
    depth_stop: int | None = None
    """The slide stops when the shallowest pruned depth reaches this (default: the last split step)."""
    width_mode: str = "off"
    """``"off"``; ``"per_branch"``: in each lineage born at the last split keep the first
    ``ratio`` of its edges by advantage (official mode 1); ``"best_worst"``: per tree, keep the
    ``ratio`` of post-split edges with the highest and lowest advantages, half each (mode 2)."""
    width_ratio: float = 0.5
    active_fraction: float = 1.0
    """Depth and width pruning act while ``iteration <= int(total_iterations * active_fraction)``."""
    train_last_step: bool = True
    """False drops the final step's edges: their child is never scored (the reward reads the x0
    predicted before the last step), so they carry no signal. DanceGRPO drops them; the official
    BranchGRPO code trains them."""
    timestep_fraction: float = 1.0
    """DanceGRPO: train a random ``int(T * fraction)`` of each trajectory's eligible steps."""

    def validate(self, num_steps: int, where: str = "PruningConfig") -> None:
        for d in self.depths:
            if not (1 <= d <= num_steps):
                raise ValueError(f"{where}: depths contains {d}, outside 1..{num_steps} (depth d is the edge "
                                 f"of step d-1); use depths between 1 and num_steps.")
        if self.width_mode not in ("off", "per_branch", "best_worst"):
            raise ValueError(f"{where}: width_mode must be 'off', 'per_branch' or 'best_worst' "
                             f"(got {self.width_mode!r}).")
        if not (0.0 < self.width_ratio <= 1.0):
            raise ValueError(f"{where}: width_ratio must be in (0, 1] (got {self.width_ratio}).")
        if not (0.0 <= self.active_fraction <= 1.0):
            raise ValueError(f"{where}: active_fraction must be in [0, 1] (got {self.active_fraction}).")
        if not (0.0 < self.timestep_fraction <= 1.0):
            raise ValueError(f"{where}: timestep_fraction must be in (0, 1] (got {self.timestep_fraction}).")
        if self.depth_slide_interval < 1:
            raise ValueError(f"{where}: depth_slide_interval must be >= 1.")


def active_depths(cfg: PruningConfig, iteration: int, split_steps: tuple[int, ...]) -> set[int]:
    """Pruned depths at ``iteration`` (0-based), following the official sliding schedule
    ``shift = min(step // interval, min(depths) - stop)`` with the 1-based ``step``."""
    if not cfg.depths:
        return set()
    if not cfg.depth_slide:
        return set(cfg.depths)
    stop = cfg.depth_stop if cfg.depth_stop is not None else (max(split_steps) if split_steps else 1)
    shift = min((iteration + 1) // cfg.depth_slide_interval, max(0, min(cfg.depths) - stop))
    return {d - shift for d in cfg.depths}


def pruning_active(cfg: PruningConfig, iteration: int, total_iterations: int) -> bool:
    return (iteration + 1) <= int(total_iterations * cfg.active_fraction)


def select_edges(tree: Tree, advantages: torch.Tensor, cfg: PruningConfig, split_steps: tuple[int, ...],
                 iteration: int = 0, total_iterations: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Child node ids of the edges to train, in node order. ``generator``: one per tree, or shared."""
    keep = (tree.parent >= 0) & tree.is_sde
    if not cfg.train_last_step:
        keep &= tree.depth != tree.num_steps
    if cfg.timestep_fraction < 1.0:
        keep &= _timestep_subset(tree, keep, cfg.timestep_fraction, generator)
    if not pruning_active(cfg, iteration, total_iterations):
        return torch.nonzero(keep).flatten()
    for d in active_depths(cfg, iteration, split_steps):
        keep &= tree.depth != d
    if cfg.width_mode != "off":
        keep = _width_prune(tree, advantages, keep, cfg, split_steps)
    return torch.nonzero(keep).flatten()


def _timestep_subset(tree: Tree, keep: torch.Tensor, fraction: float,
                     generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Per root, a random ``int(T * fraction)`` of the eligible steps (DanceGRPO's random permutation)."""
    out = torch.zeros_like(keep)
    steps = tree.depth - 1
    roots = torch.nonzero(tree.parent < 0).flatten()
    for r in roots.tolist():
        gen = generator[int(tree.tree[r])] if isinstance(generator, (list, tuple)) else generator
        mine = keep & (tree.root == r)
        eligible = torch.unique(steps[mine])
        n = int(eligible.numel() * fraction)
        chosen = eligible[torch.randperm(eligible.numel(), generator=gen)[:n]]
        out |= mine & torch.isin(steps, chosen)
    return out


def _width_prune(tree: Tree, adv: torch.Tensor, keep: torch.Tensor, cfg: PruningConfig,
                 split_steps: tuple[int, ...]) -> torch.Tensor:
    last_split = max(split_steps) if split_steps else -1
    last_layer = keep & (tree.depth - 1 > last_split)
    out = keep & ~last_layer
    if cfg.width_mode == "per_branch":
        group = tree.ancestor_at(last_split + 1) if last_split >= 0 else tree.root
    else:
        group = tree.tree
    for g in torch.unique(group[last_layer]).tolist():
        ids = torch.nonzero(last_layer & (group == g)).flatten()
        order = torch.sort(adv[ids], descending=True, stable=True).indices
        ranked = ids[order]
        n = ids.numel()
        if cfg.width_mode == "per_branch":
            chosen = ranked[:max(1, int(n * cfg.width_ratio))]
        else:
            k = max(2, int(n * cfg.width_ratio))
            best = k // 2
            chosen = torch.cat([ranked[:best], ranked[n - (k - best):]]) if n > k else ranked
        out[chosen] = True
    return out
