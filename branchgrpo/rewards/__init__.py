"""Reward models: one interface, ``reward(images, prompts) -> scores`` (see :mod:`.base`).

Model-based scorers (ImageReward, HPS v2.1, PickScore, CLIP score, LAION aesthetic) load from local
files only (:mod:`.files`) and import their heavy dependencies lazily; weight-free rewards
(:mod:`.weight_free`) need nothing. :func:`make_reward` builds any of them by name;
:class:`RewardMix` combines several with weights.
"""
from .base import ModelReward, Reward, aggregate_video
from .files import MODEL_CARDS, RewardLoadError, WeightsNotFoundError
from .mix import RewardMix
from .registry import MODEL_REWARDS, make_reward, reward_names

__all__ = ["Reward", "ModelReward", "aggregate_video", "RewardMix", "make_reward", "reward_names", "MODEL_REWARDS",
           "MODEL_CARDS", "WeightsNotFoundError", "RewardLoadError"]
