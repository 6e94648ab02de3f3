"""The tree rollout (SPEC §2): every live node of a step, across all trees of the batch, goes through
the model in one batched call (chunked by ``max_batch``); a fork's children share their parent's
evaluation; every edge is recorded.

A :class:`Tree` stores nodes flat, ordered by depth and, within a depth, by parent (the children of
parent ``j`` are contiguous). Every non-root node is the child end of exactly one edge, so edge data
(old log-prob, SDE or not, fork or not) lives on the child node. Depth ``d`` nodes were produced by
step ``d - 1``; roots have depth 0; leaves have depth ``num_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .models.base import VelocityModel
from .schedule import BranchSchedule
from .sde import gaussian_logprob, quantize_timestep, step_distribution

ModelCallHook = Callable[[str, int, int], None]
"""Called before every model call as ``hook(phase, done, total)``; may raise to cancel."""


@dataclass
class Tree:
    latents: torch.Tensor      # [num_nodes, *latent_shape] fp32, exactly what was sampled
    parent: torch.Tensor       # [num_nodes] long, -1 for roots
    depth: torch.Tensor        # [num_nodes] long
    tree: torch.Tensor         # [num_nodes] long: which prompt of the batch (one tree per prompt)
    root: torch.Tensor         # [num_nodes] long: which root (trajectory group member) it descends from
    logprob: torch.Tensor      # [num_nodes] fp32: old log-prob of the edge into the node (0 for roots / ODE)
    is_sde: torch.Tensor       # [num_nodes] bool: the edge into the node is stochastic
    is_fork: torch.Tensor      # [num_nodes] bool: the edge into the node was made at a split with K > 1
    leaves: torch.Tensor       # [num_leaves] node ids of depth num_steps
    leaf_x0: torch.Tensor      # [num_leaves, *latent_shape]: x0 predicted at the last step (what is scored)
    sigmas: torch.Tensor       # [num_steps + 1] float64
    num_trees: int
    num_steps: int
    nfe: int                   # model evaluations spent by the rollout
    iteration: int = 0

    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])

    @property
    def edges(self) -> torch.Tensor:
        """Child node ids of every edge."""
        return torch.nonzero(self.parent >= 0).flatten()

    @property
    def num_edges(self) -> int:
        return int((self.parent >= 0).sum())

    def leaf_tree(self) -> torch.Tensor:
        return self.tree[self.leaves]

    def children_count(self) -> torch.Tensor:
        counts = torch.zeros(self.num_nodes, dtype=torch.long)
        p = self.parent[self.parent >= 0]
        counts.index_add_(0, p, torch.ones_like(p))
        return counts

    def ancestor_at(self, depth: int) -> torch.Tensor:
        """For every node at depth >= ``depth``, its ancestor at ``depth`` (itself at that depth); -1 above."""
        anc = torch.full((self.num_nodes,), -1, dtype=torch.long)
        at = self.depth == depth
        anc[at] = torch.nonzero(at).flatten()
        for d in range(depth + 1, self.num_steps + 1):
            ids = torch.nonzero(self.depth == d).flatten()
            anc[ids] = anc[self.parent[ids]]
        return anc


def _model_sigma(sigma: float, n: int, schedule: BranchSchedule, device) -> torch.Tensor:
    s = torch.full((n,), float(sigma), dtype=torch.float32, device=device)
    if schedule.timestep_quantum > 0:
        s = quantize_timestep(s, schedule.timestep_quantum)
    return s


def evaluate_velocity(model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, cond: Any,
                      index: torch.Tensor, max_batch: int, dtype: torch.dtype | None = None,
                      hook: ModelCallHook | None = None, phase: str = "rollout",
                      progress: tuple[int, int] | None = None) -> torch.Tensor:
    """``model.velocity`` over ``x`` in chunks of at most ``max_batch`` rows; returns fp32."""
    out = []
    done, total = progress if progress is not None else (0, x.shape[0])
    for start in range(0, x.shape[0], max_batch):
        sl = slice(start, start + max_batch)
        if hook is not None:
            hook(phase, done + start, total)
        xi = x[sl] if dtype is None else x[sl].to(dtype)
        out.append(model.velocity(xi, sigma[sl], cond, index[sl]).float())
    return torch.cat(out, dim=0)


@torch.no_grad()
def rollout(model: VelocityModel, cond: Any, num_prompts: int, schedule: BranchSchedule,
            latent_shape: tuple[int, ...], *, generator: torch.Generator | Sequence[torch.Generator],
            iteration: int = 0,
            max_batch: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            init_noise: torch.Tensor | None = None, hook: ModelCallHook | None = None) -> Tree:
    """Sample one tree per prompt (``group_size`` roots each) and record every node and edge.

    Randomness comes only from ``generator``: CPU generators, so the same seed gives the same tree on
    any device and for any ``max_batch``. Give one generator per tree to make each tree independent
    of which other trees share the batch (or the process, in a distributed run); a single generator
    is shared by all trees. Each tree's noise for a level is drawn at once, in node order.
    ``dtype`` is the model's compute dtype; latents and step arithmetic stay fp32.
    """
    device = torch.device(device)
    sigmas = schedule.sigmas()
    sigma_one = float(sigmas[1]) if schedule.num_steps > 1 else None
    forks = schedule.branching_at()
    n_roots = num_prompts * schedule.group_size
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * num_prompts
    if len(gens) != num_prompts:
        raise ValueError(f"{len(gens)} generators for {num_prompts} trees")

    def draw(per_tree: int) -> torch.Tensor:
        return torch.cat([torch.randn((per_tree, *latent_shape), generator=g) for g in gens], dim=0)

    if init_noise is None:
        init_noise = draw(schedule.group_size)
    x = init_noise.to(device=device, dtype=torch.float32)
    total_nfe = num_prompts * schedule.rollout_nfe()

    lat = [x]
    parent = [torch.full((n_roots,), -1, dtype=torch.long)]
    tree_id = torch.arange(num_prompts).repeat_interleave(schedule.group_size)
    root_id = torch.arange(n_roots)
    trees, roots = [tree_id], [root_id]
    logps = [torch.zeros(n_roots)]
    sde_flags = [torch.zeros(n_roots, dtype=torch.bool)]
    fork_flags = [torch.zeros(n_roots, dtype=torch.bool)]
    offset, nfe = 0, 0
    leaf_x0 = None
    for i in range(schedule.num_steps):
        width = x.shape[0]
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = evaluate_velocity(model, x, _model_sigma(s, width, schedule, device), cond,
                              tree_id.to(device), max_batch, dtype, hook, "rollout", (nfe, total_nfe))
        nfe += width
        sde = schedule.is_sde(i, iteration)
        mean, std = step_distribution(x, v, torch.tensor(s), torch.tensor(s_next),
                                      schedule.sde if sde else "ode", schedule.eta, sigma_one)
        k = forks.get(i, 1)
        rep = torch.arange(width).repeat_interleave(k)
        noise = draw(width * k // num_prompts).to(device)
        mean_c, std_c = mean[rep.to(device)], std[rep.to(device)]
        is_fork = k > 1
        if sde:
            scale = schedule.split_noise_scale if is_fork else 1.0
            child = mean_c + scale * std_c * noise
            lp_std = std_c * scale if (is_fork and schedule.split_logprob == "exact") else std_c
            lp = gaussian_logprob(child, mean_c, lp_std).cpu()
        else:
            child = mean_c
            lp = torch.zeros(width * k)
        if i == schedule.num_steps - 1:
            leaf_x0 = (x - s * v)[rep.to(device)]
        lat.append(child)
        parent.append(offset + rep)
        tree_id = tree_id[rep]
        root_id = root_id[rep]
        trees.append(tree_id)
        roots.append(root_id)
        logps.append(lp.float())
        sde_flags.append(torch.full((width * k,), sde, dtype=torch.bool))
        fork_flags.append(torch.full((width * k,), is_fork, dtype=torch.bool))
        offset += width
        x = child

    depth = torch.cat([torch.full((t.shape[0],), d, dtype=torch.long) for d, t in enumerate(trees)])
    latents = torch.cat(lat, dim=0)
    num_nodes = latents.shape[0]
    leaves = torch.arange(num_nodes - x.shape[0], num_nodes)
    return Tree(latents=latents, parent=torch.cat(parent), depth=depth, tree=torch.cat(trees),
                root=torch.cat(roots), logprob=torch.cat(logps), is_sde=torch.cat(sde_flags),
                is_fork=torch.cat(fork_flags), leaves=leaves, leaf_x0=leaf_x0, sigmas=sigmas,
                num_trees=num_prompts, num_steps=schedule.num_steps, nfe=nfe, iteration=iteration)
