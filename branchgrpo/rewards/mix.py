"""Several rewards with weights: ``RewardMix``.

A mix is what the trainer receives as one REWARD_MODEL: it exposes ``rewards`` (the scorers),
``weights`` (one float each) and ``aggregation``, and the engine
(:func:`branchgrpo.advantage.compute_advantages`) combines them:

``"reward_sum"``
    one reward ``r = sum_k w_k r_k`` per leaf, then advantages as for a single reward.
``"advantage_sum"``
    advantages of each reward separately (each normalised on its own scale), then
    ``A = sum_k w_k A_k`` (MixGRPO's aggregation): rewards on very different scales (PickScore ~20,
    HPS ~0.3) then count by their weights, not by their raw spread.

A mix is also callable: ``mix(images, prompts)`` is the weighted sum ``sum_k w_k r_k`` (what Score
Images shows, and the training reward of ``"reward_sum"``); :meth:`RewardMix.score_all` gives the
``[R, N]`` matrix of individual scores.

Nesting: a ``reward_sum`` mix inside a ``reward_sum`` mix, or an ``advantage_sum`` mix inside an
``advantage_sum`` mix, is flattened (weights multiplied; exact). A ``reward_sum`` mix inside an
``advantage_sum`` mix stays one member (its weighted sum is one reward; exact). An ``advantage_sum``
mix inside a ``reward_sum`` mix has no exact meaning and is refused. Members with weight 0 are
dropped (they would change nothing but cost a forward pass).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .base import Prompts, check_images

__all__ = ["RewardMix", "AGGREGATIONS"]

AGGREGATIONS = ("reward_sum", "advantage_sum")


def _call(reward, images, prompts, grad: bool):
    return reward(images, prompts, grad=True) if grad else reward(images, prompts)


class RewardMix:
    """Weighted rewards (see the module docstring)."""

    def __init__(self, rewards: Sequence, weights: Sequence[float] | None = None,
                 aggregation: str = "reward_sum", where: str = "RewardMix"):
        rewards = list(rewards)
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{where}: aggregation must be one of {', '.join(AGGREGATIONS)} (got {aggregation!r}).")
        if len(weights) != len(rewards):
            raise ValueError(f"{where}: {len(rewards)} rewards but {len(weights)} weights; give one weight each.")
        for r, w in zip(rewards, weights):
            if not callable(r):
                raise ValueError(f"{where}: {type(r).__name__} is not a reward model (not callable).")
            if not math.isfinite(w):
                raise ValueError(f"{where}: weights must be finite numbers (got {w}).")
        flat_r: List = []
        flat_w: List[float] = []
        for r, w in zip(rewards, weights):
            if w == 0.0:
                continue
            if isinstance(r, RewardMix) and (r.aggregation == aggregation):
                flat_r += r.rewards
                flat_w += [w * wi for wi in r.weights]
            elif isinstance(r, RewardMix) and r.aggregation == "advantage_sum":
                raise ValueError(f"{where}: an 'advantage_sum' mix cannot be nested inside a 'reward_sum' mix "
                                 "(advantages are not rewards); set this mix to 'advantage_sum' as well, or "
                                 "make the inner mix 'reward_sum'.")
            else:
                flat_r.append(r)
                flat_w.append(w)
        if not flat_r:
            raise ValueError(f"{where}: every weight is 0; give at least one reward a non-zero weight.")
        self.rewards = flat_r
        self.weights = flat_w
        self.aggregation = aggregation

    @property
    def name(self) -> str:
        return "mix(" + ", ".join(f"{w:g}*{getattr(r, 'name', type(r).__name__)}"
                                  for r, w in zip(self.rewards, self.weights)) + f"; {self.aggregation})"

    @property
    def differentiable(self) -> bool:
        return all(getattr(r, "differentiable", False) for r in self.rewards)

    def score_all(self, images: torch.Tensor, prompts: Prompts = None, grad: bool = False) -> torch.Tensor:
        """Scores of every member, ``[R, N]`` float32."""
        check_images(images, "RewardMix")
        rows = [_call(r, images, prompts, grad).to(device=images.device, dtype=torch.float32).reshape(-1)
                for r in self.rewards]
        return torch.stack(rows)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k scores[k]`` for ``scores [R, N]``."""
        w = torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)
        return (w[:, None] * scores).sum(dim=0)

    def __call__(self, images: torch.Tensor, prompts: Prompts = None, grad: bool = False) -> torch.Tensor:
        return self.combine(self.score_all(images, prompts, grad))

    def __repr__(self) -> str:
        return f"RewardMix({self.name})"
