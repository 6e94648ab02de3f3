"""What a rollout trains: an *objective*, chosen independently of the sampler (docs/methods.md).

``ppo`` trains the SDE edges of a rollout through their Gaussian log-probabilities (:mod:`branchgrpo.loss`). The
forward-process objectives need no log-probability: they take the clean samples ``x0`` a rollout produced (the
tree's leaves, or a flat group's trajectories, SDE or ODE), their advantages and their groups, re-noise ``x0`` at a
few timesteps of the rollout's sigma schedule, ``x_t = (1 - t) x0 + t eps``, and score the model's velocity against
the flow-matching target ``eps - x0``. So any sampler can feed any of them.

One module per method, each with its loss (pure functions of tensors, tested against hand computations and
``gradcheck``), its official defaults (``defaults()``), what it evaluates besides the policy (``needs_old_forward``,
``needs_reference``) and how it trains a unit of whole groups (``train_unit``, ``calls``). Adding a method is one
module and one line of :data:`METHODS`; :func:`forward_update` runs any of them.
"""
from __future__ import annotations

from types import ModuleType

from . import awm, dgpo, nft, ppo
from .awm import awm_logprob, awm_loss
from .common import EMAPolicy, forward_update, old_decay, pick_timesteps, timestep_candidates, velocity_kl
from .config import ObjectiveConfig
from .dgpo import dgpo_clip_mask, dgpo_loss
from .nft import nft_loss, nft_reward_weight

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (ppo, nft, awm, dgpo)}
"""The registry: name -> module."""
OBJECTIVES = tuple(METHODS)


def method_module(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


__all__ = ["METHODS", "OBJECTIVES", "ObjectiveConfig", "EMAPolicy", "forward_update", "method_module", "old_decay",
           "pick_timesteps", "timestep_candidates", "velocity_kl", "nft_loss", "nft_reward_weight", "awm_logprob",
           "awm_loss", "dgpo_loss", "dgpo_clip_mask"]
