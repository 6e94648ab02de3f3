"""The interface every scorer implements.

Images come in ComfyUI's IMAGE layout: ``[N, H, W, 3]`` floats in ``[0, 1]``; video leaves
are ``[N, T, H, W, 3]`` and scorers that only know images score each frame and aggregate
(see :func:`score_video`). One score per image comes back, as a float32 tensor ``[N]``.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores ``[N]`` for images ``[N, H, W, 3]`` (or ``[N, T, H, W, 3]``) and their prompts."""
