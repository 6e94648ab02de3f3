"""Named configurations: the paper's BranchGRPO variants and the baselines it compares against.

Each preset is a :class:`~branchgrpo.trainer.TrainerConfig`; override any field afterwards.
Counts per prompt (20 steps, splits 0,3,6,9, K=2): 16 leaves, 203 rollout model evaluations, 218 edges.

=====================  ==========================================================================
``dancegrpo``          flat group of 16, 20 steps, eta 0.3, group z-score, every step trained
``dancegrpo-tf0.6``    the same, training a random 60% of each trajectory's steps
``flowgrpo``           flat group of 16, 10 steps, Flow-GRPO SDE a=0.7, global std, KL 0.04
``mixgrpo``            flat group of 16, 20 steps, Flow-GRPO SDE in a sliding 5-step window, ODE elsewhere
``branchgrpo``         tree, splits 0,3,6,9, K=2, split-noise 4.0, depth-wise advantages, all edges
``branchgrpo-deppru``  + depth pruning of 5 depths of the 16-wide region (8.625 trained edges/leaf)
``branchgrpo-widpru``  + width pruning, best/worst half of the post-split edges (8.625 edges/leaf)
``branchgrpo-mix``     + SDE only on steps 0-3 and the split steps, ODE elsewhere
``tempflow-grpo``      ODE except one SDE branching step (redrawn each iteration in 0-6 of 10) into
                       16 children; only the branch edges trained, noise-aware weighted
``flowgrpo-fast``      flat group of 16, 10 steps, ODE except a 2-step SDE window placed at random in
                       steps 0-4 each iteration; only the window trained
``diffusionnft``       flat ODE group of 16, 10 steps; DiffusionNFT on the clean samples, 9 timesteps
``awm``                flat ODE group of 16, 14 steps; AWM (PPO ratio of the flow-matching error)
``dgpo``               flat ODE group of 16, 10 steps; DGPO group preference, 4 timesteps
``branch-nft``         the BranchGRPO tree (SDE only at the forks) feeding DiffusionNFT
``branch-awm``         the BranchGRPO tree (SDE only at the forks) feeding AWM
``branch-dgpo``        the BranchGRPO tree (SDE only at the forks) feeding DGPO
=====================  ==========================================================================

Forward-process presets (docs/methods.md) roll out without CFG and train on the clean samples;
their defaults are the official configurations' (SD3.5-M), with Euler in place of the DPM solvers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .advantage import AdvantageConfig
from .loss import OptimConfig
from .objectives import METHODS as OBJECTIVE_MODULES, ObjectiveConfig, awm, dgpo, nft
from .pruning import PruningConfig
from .schedule import BranchSchedule
from .trainer import TrainerConfig


def _dancegrpo(timestep_fraction: float = 1.0) -> TrainerConfig:
    return TrainerConfig(
        schedule=BranchSchedule(num_steps=20, split_steps=(), branching=1, group_size=16, sde="dancegrpo",
                                eta=0.3, shift=3.0),
        advantage=AdvantageConfig(mode="group"),
        # The paper's table counts 20 trained steps at tf 1.0 and 12 at tf 0.6, so every step is
        # eligible here (the DanceGRPO code also drops the last one: set train_last_step=False).
        pruning=PruningConfig(timestep_fraction=timestep_fraction),
        optim=OptimConfig(clip_range=1e-4),
    )


def _flowgrpo() -> TrainerConfig:
    return TrainerConfig(
        schedule=BranchSchedule(num_steps=10, split_steps=(), branching=1, group_size=16, sde="flowgrpo",
                                eta=0.7, shift=3.0),
        advantage=AdvantageConfig(mode="group", global_std=True),
        pruning=PruningConfig(train_last_step=False),
        optim=OptimConfig(clip_range=1e-4, kl_beta=0.04),
    )


def _mixgrpo() -> TrainerConfig:
    return TrainerConfig(
        schedule=BranchSchedule(num_steps=20, split_steps=(), branching=1, group_size=16, sde="flowgrpo",
                                eta=0.7, shift=3.0, sde_window=(0, 5), sde_window_slide_every=25),
        advantage=AdvantageConfig(mode="group"),
        optim=OptimConfig(clip_range=1e-4),
    )


def _branchgrpo(**pruning) -> Callable[[], TrainerConfig]:
    def make() -> TrainerConfig:
        return TrainerConfig(
            schedule=BranchSchedule(num_steps=20, split_steps=(0, 3, 6, 9), branching=2, split_noise_scale=4.0,
                                    sde="dancegrpo", eta=0.3, shift=3.0),
            advantage=AdvantageConfig(mode="tree", fusion="mean", clip=5.0),
            pruning=PruningConfig(**pruning),
            optim=OptimConfig(clip_range=1e-3),
        )
    return make


def _branchgrpo_mix() -> TrainerConfig:
    cfg = _branchgrpo()()
    cfg.schedule.sde_window = (0, 4)
    return cfg


def _tempflow() -> TrainerConfig:
    return TrainerConfig(
        schedule=BranchSchedule(num_steps=10, split_steps=(0,), branching=16, split_noise_scale=1.0,
                                sde="flowgrpo", eta=0.7, shift=3.0, sde_window=(0, 0), branch_step_range=(0, 7)),
        advantage=AdvantageConfig(mode="tree", fusion="mean", clip=5.0),
        optim=OptimConfig(clip_range=1e-4, noise_weighting=True),
    )


def _flowgrpo_fast() -> TrainerConfig:
    cfg = _flowgrpo()
    cfg.schedule.sde_window = (0, 2)
    cfg.schedule.sde_window_range = (0, 5)
    return cfg


_nft, _awm, _dgpo = nft.defaults, awm.defaults, dgpo.defaults


def _flat_forward(objective: Callable[[], ObjectiveConfig], num_steps: int, global_std: bool = False
                  ) -> Callable[[], TrainerConfig]:
    def make() -> TrainerConfig:
        return TrainerConfig(
            schedule=BranchSchedule(num_steps=num_steps, split_steps=(), branching=1, group_size=16,
                                    sde="flowgrpo", eta=0.7, shift=3.0, sde_window=(0, 0)),
            advantage=AdvantageConfig(mode="group", global_std=global_std),
            optim=OptimConfig(learning_rate=3e-4),
            objective=objective(),
        )
    return make


def _branch_forward(objective: Callable[[], ObjectiveConfig]) -> Callable[[], TrainerConfig]:
    def make() -> TrainerConfig:
        cfg = _branchgrpo()()
        cfg.schedule.sde_window = (0, 0)  # ODE except the forks: the leaves stay close to ODE samples
        cfg.optim.learning_rate = 3e-4
        cfg.objective = objective()
        return cfg
    return make


PRESETS: dict[str, Callable[[], TrainerConfig]] = {
    "dancegrpo": _dancegrpo,
    "dancegrpo-tf0.6": lambda: _dancegrpo(0.6),
    "flowgrpo": _flowgrpo,
    "mixgrpo": _mixgrpo,
    "branchgrpo": _branchgrpo(),
    # Five depths of the 16-wide region, sliding one shallower every 30 iterations and stopping at
    # depth 10 (the first 16-wide depth), so the paper's 138 edges (8.625 per leaf) hold throughout.
    "branchgrpo-deppru": _branchgrpo(depths=(16, 17, 18, 19, 20), depth_slide=True, depth_slide_interval=30,
                                     depth_stop=10),
    "branchgrpo-widpru": _branchgrpo(width_mode="best_worst", width_ratio=0.5),
    "branchgrpo-mix": _branchgrpo_mix,
    "tempflow-grpo": _tempflow,
    "flowgrpo-fast": _flowgrpo_fast,
    "diffusionnft": _flat_forward(_nft, 10, global_std=True),
    "awm": _flat_forward(_awm, 14, global_std=True),
    "dgpo": _flat_forward(_dgpo, 10),
    "branch-nft": _branch_forward(_nft),
    "branch-awm": _branch_forward(_awm),
    "branch-dgpo": _branch_forward(_dgpo),
}


METHODS: dict[str, Callable[[], ObjectiveConfig]] = {name: m.defaults for name, m in OBJECTIVE_MODULES.items()}
"""Each objective with its official defaults (what the presets above use)."""


def method(name: str) -> ObjectiveConfig:
    """A fresh :class:`~branchgrpo.objectives.ObjectiveConfig` of ``name`` with its official defaults."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def preset(name: str, **overrides) -> TrainerConfig:
    """A fresh config for ``name``; top-level fields can be overridden by keyword."""
    try:
        cfg = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
