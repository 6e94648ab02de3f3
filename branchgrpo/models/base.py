"""The only view of a flow-matching model the engine has.

The engine never knows whether it drives a ComfyUI ``ModelPatcher``, a diffusers
transformer or a tiny test network: it calls :meth:`VelocityModel.encode` once per
iteration for that iteration's prompts, then :meth:`VelocityModel.velocity` for
batches of latents, each row tagged with the index of its prompt.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class VelocityModel(Protocol):
    """A rectified-flow model: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, ``v ~ noise - x0``."""

    def encode(self, prompts: Sequence[str]) -> Any:
        """Conditioning for a list of prompts (opaque to the engine)."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, index: torch.Tensor) -> torch.Tensor:
        """Velocity for ``x`` ``[N, C, ...]`` at ``sigma`` ``[N]`` (in ``[0, 1]``).

        ``index`` ``[N]`` (long) says which prompt of ``cond`` each row uses. The result has
        the shape of ``x``. Gradients flow when autograd is enabled.
        """
