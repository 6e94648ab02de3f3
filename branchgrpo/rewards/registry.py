"""One registry for every reward: the weight-free ones and the model-based ones.

``make_reward(name, **kwargs)`` builds any of them; model-based ones take the loader's arguments
(a weights path or name, ``search_dirs``, ``device``, ``dtype``, ``batch_size``, ``max_frames``,
``temporal_weight`` ...). Model loaders import their heavy dependencies only when called.

=================  =========================================  ==========================================
name               scorer                                     local weights (see ``files.MODEL_CARDS``)
=================  =========================================  ==========================================
imagereward        :func:`.imagereward.load_imagereward`      ``ImageReward.pt``
hps_v2.1           :func:`.hps.load_hps`                      ``HPS_v2.1_compressed.pt``
pickscore          :func:`.clip_models.load_pickscore`        folder ``PickScore_v1`` (+ processor)
clip_score         :func:`.clip_models.load_clip_score`       folder ``clip-vit-large-patch14``
aesthetic          :func:`.aesthetic.load_aesthetic`          ``sac+logos+ava1-l14-linearMSE.pth`` + CLIP
weight-free names  :mod:`.weight_free`                        none
=================  =========================================  ==========================================
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List

from .weight_free import WEIGHT_FREE_REWARDS, make_weight_free

__all__ = ["MODEL_REWARDS", "make_reward", "reward_names"]

# name -> "module:function" (imported lazily)
MODEL_REWARDS: Dict[str, str] = {
    "imagereward": "imagereward:load_imagereward",
    "hps_v2.1": "hps:load_hps",
    "pickscore": "clip_models:load_pickscore",
    "clip_score": "clip_models:load_clip_score",
    "aesthetic": "aesthetic:load_aesthetic",
}


def _loader(name: str) -> Callable:
    module, fn = MODEL_REWARDS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def reward_names() -> List[str]:
    return sorted(MODEL_REWARDS) + sorted(WEIGHT_FREE_REWARDS)


def make_reward(name: str, *args, **kwargs):
    """Build the reward registered under ``name`` (model-based: ``*args``/``**kwargs`` go to its loader)."""
    if name in MODEL_REWARDS:
        return _loader(name)(*args, **kwargs)
    if name in WEIGHT_FREE_REWARDS:
        return make_weight_free(name, **kwargs)
    raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(reward_names())}")
