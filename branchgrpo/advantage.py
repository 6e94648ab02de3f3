"""From leaf rewards to an advantage on every edge (SPEC §3).

Tree mode (BranchGRPO): leaf rewards are fused upward (mean of the leaf descendants, or
path-probability weighted), then z-scored per depth inside each tree; an edge carries its child's
advantage. Group mode (DanceGRPO / Flow-GRPO): leaf rewards are z-scored per prompt (optionally with
one std over the whole batch) and every edge carries the mean advantage of the leaves below it
(for a flat group, that is simply its trajectory's advantage).

Several rewards: ``"reward_sum"`` fuses ``sum_k w_k r_k`` first; ``"advantage_sum"`` computes the
advantage of each reward separately and sums them with the weights (MixGRPO's aggregation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .tree import Tree


@dataclass
class AdvantageConfig:
    mode: str = "tree"
    """``"tree"``: per-depth z-scores of fused node rewards (BranchGRPO). ``"group"``: per-prompt z-scores
    of leaf rewards (DanceGRPO / Flow-GRPO)."""
    fusion: str = "mean"
    """Tree mode: ``"mean"`` of leaf descendants (official default), or ``"path_prob"``: softmax over
    sibling edge log-probs with ``temperature`` (the paper's path-probability weighting)."""
    temperature: float = 1.0
    """Path-probability fusion: weights are ``softmax(temperature * logp)`` among siblings."""
    global_std: bool = False
    """Group mode: divide by one std over the whole batch instead of each prompt's (Flow-GRPO)."""
    clip: float = 5.0
    """Advantages are clamped to ``[-clip, clip]`` (``adv_clip_max``)."""
    aggregation: str = "reward_sum"
    """Several rewards: ``"reward_sum"`` or ``"advantage_sum"``."""
    eps: float = 1e-8
    min_std: float = 1e-6
    """A depth (or group) whose reward std is below this gets zero advantage."""

    def validate(self, where: str = "AdvantageConfig") -> None:
        if self.mode not in ("tree", "group"):
            raise ValueError(f"{where}: mode must be 'tree' or 'group' (got {self.mode!r}).")
        if self.fusion not in ("mean", "path_prob"):
            raise ValueError(f"{where}: fusion must be 'mean' or 'path_prob' (got {self.fusion!r}).")
        if self.aggregation not in ("reward_sum", "advantage_sum"):
            raise ValueError(f"{where}: aggregation must be 'reward_sum' or 'advantage_sum' "
                             f"(got {self.aggregation!r}).")
        if self.clip <= 0:
            raise ValueError(f"{where}: clip must be > 0 (got {self.clip}); use a large value to disable it.")
        if self.temperature < 0:
            raise ValueError(f"{where}: temperature must be >= 0 (got {self.temperature}).")


def _levels(tree: Tree) -> list[torch.Tensor]:
    return [torch.nonzero(tree.depth == d).flatten() for d in range(tree.num_steps + 1)]


def node_rewards(tree: Tree, leaf_rewards: torch.Tensor, fusion: str = "mean",
                 temperature: float = 1.0) -> torch.Tensor:
    """Reward of every node, fused bottom-up from the leaves. Returns ``[num_nodes]`` fp64."""
    r = torch.zeros(tree.num_nodes, dtype=torch.float64)
    r[tree.leaves] = leaf_rewards.detach().double().cpu()
    levels = _levels(tree)
    if fusion == "mean":
        total = r.clone()
        count = torch.zeros(tree.num_nodes, dtype=torch.float64)
        count[tree.leaves] = 1.0
        for d in range(tree.num_steps, 0, -1):
            ids = levels[d]
            p = tree.parent[ids]
            total.index_add_(0, p, total[ids])
            count.index_add_(0, p, count[ids])
        return total / count.clamp_min(1.0)
    if fusion == "path_prob":
        for d in range(tree.num_steps, 0, -1):
            ids = levels[d]
            p = tree.parent[ids]
            logit = temperature * tree.logprob[ids].double()
            pmax = torch.full((tree.num_nodes,), -float("inf"), dtype=torch.float64)
            pmax.scatter_reduce_(0, p, logit, reduce="amax")
            w = torch.exp(logit - pmax[p])
            wsum = torch.zeros(tree.num_nodes, dtype=torch.float64).index_add_(0, p, w)
            w = w / wsum[p]
            r.index_add_(0, p, w * r[ids])
        return r
    raise ValueError(f"unknown fusion {fusion!r}")


def _zscore_by_group(values: torch.Tensor, group: torch.Tensor, eps: float, min_std: float,
                     std_override: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) with the unbiased std; groups of one or of ~zero std give 0."""
    n_groups = int(group.max()) + 1 if group.numel() else 0
    cnt = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(values))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, values) / cnt.clamp_min(1)
    dev = values - mean[group]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, dev * dev) / (cnt - 1).clamp_min(1)
    std = var.sqrt() if std_override is None else std_override.expand(n_groups)
    adv = dev / (std[group] + eps)
    dead = (cnt[group] < 2) | (std[group] < min_std)
    return torch.where(dead, torch.zeros_like(adv), adv)


def depth_advantages(tree: Tree, node_r: torch.Tensor, eps: float = 1e-8, min_std: float = 1e-6) -> torch.Tensor:
    """Per-depth z-scores within each tree (no pooling across prompts). Returns ``[num_nodes]``."""
    key = tree.tree * (tree.num_steps + 1) + tree.depth
    return _zscore_by_group(node_r, key, eps, min_std)


def group_advantages(tree: Tree, leaf_rewards: torch.Tensor, global_std: bool = False,
                     eps: float = 1e-8, min_std: float = 1e-6,
                     batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's per-prompt normalisation of the leaves, spread to every node as the mean over its leaves.

    ``global_std`` divides by the std of ``batch_rewards`` (every leaf of the batch, across processes
    in a distributed run; default: this tree batch's leaves)."""
    r = leaf_rewards.detach().double().cpu()
    pool = r if batch_rewards is None else batch_rewards.detach().double().cpu()
    std = pool.std().reshape(1) if global_std and pool.numel() > 1 else None
    leaf_adv = _zscore_by_group(r, tree.leaf_tree(), eps, min_std, std)
    return node_rewards(tree, leaf_adv, "mean")


def single_reward_advantages(tree: Tree, leaf_rewards: torch.Tensor, cfg: AdvantageConfig,
                             batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.mode == "group":
        return group_advantages(tree, leaf_rewards, cfg.global_std, cfg.eps, cfg.min_std, batch_rewards)
    node_r = node_rewards(tree, leaf_rewards, cfg.fusion, cfg.temperature)
    return depth_advantages(tree, node_r, cfg.eps, cfg.min_std)


def compute_advantages(tree: Tree, rewards: torch.Tensor | Sequence[torch.Tensor],
                       cfg: AdvantageConfig, weights: Sequence[float] | None = None,
                       batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage of every node (the edge into it carries it), clipped. ``rewards``: ``[L]`` or ``[R, L]``.

    ``batch_rewards`` (``[R, L_total]``): every leaf of the batch across processes, for statistics
    that span the batch (group mode's global std); default: ``rewards``."""
    if isinstance(rewards, (list, tuple)):
        rewards = torch.stack([torch.as_tensor(r) for r in rewards])
    rewards = rewards.detach().double().cpu()
    if rewards.dim() == 1:
        rewards = rewards[None]
    w = torch.ones(rewards.shape[0], dtype=torch.float64) if weights is None else \
        torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != rewards.shape[0]:
        raise ValueError(f"{rewards.shape[0]} rewards but {w.numel()} weights")
    batch = rewards if batch_rewards is None else batch_rewards.detach().double().cpu().reshape(rewards.shape[0], -1)
    if cfg.aggregation == "reward_sum" or rewards.shape[0] == 1:
        adv = single_reward_advantages(tree, (w[:, None] * rewards).sum(0), cfg, (w[:, None] * batch).sum(0))
    else:
        adv = sum(wk * single_reward_advantages(tree, rk, cfg, bk) for wk, rk, bk in zip(w, rewards, batch))
    return adv.clamp(-cfg.clip, cfg.clip).float()
