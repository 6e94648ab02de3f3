"""PPO-clip on the rollout's SDE edges (``ppo``): BranchGRPO, DanceGRPO, Flow-GRPO and MixGRPO.

Each stochastic step's Gaussian log-probability ratio, weighted by the edge's advantage; its update is
:func:`branchgrpo.loss.policy_update` (the optimizer settings, clip and KL are :class:`branchgrpo.loss.OptimConfig`).
"""
from __future__ import annotations

from .config import ObjectiveConfig

NAME = "ppo"


def defaults() -> ObjectiveConfig:
    return ObjectiveConfig(name=NAME)


def needs_old_forward(cfg: ObjectiveConfig) -> bool:
    return False


def needs_reference(cfg: ObjectiveConfig) -> bool:
    return cfg.kl_beta > 0


def calls(n_unit: int, max_batch: int) -> int:
    raise TypeError("ppo trains SDE edges (branchgrpo.loss.policy_update), not clean samples")


train_unit = calls
