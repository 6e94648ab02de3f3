"""Rewards that need no model weights: handy for demos, tests and benchmarks.

Every scorer here follows :class:`branchgrpo.rewards.base.Reward`: ``reward(images, prompts)``
with images in ComfyUI's IMAGE layout ``[N, H, W, 3]`` (floats in ``[0, 1]``) or video
``[N, T, H, W, 3]`` (each frame is scored and the frame scores are averaged), returning a
float32 tensor ``[N]``. Prompts are accepted for interface compatibility and ignored.

Each class carries ``differentiable``: whether the score is a differentiable function of the
pixels (so it could drive direct reward back-propagation, not only policy-gradient RL).

Scorers
-------
``jpeg_compressibility`` / ``jpeg_incompressibility``
    DDPO's classic pair (Black et al., 2023, "Training Diffusion Models with Reinforcement
    Learning"): encode each image as JPEG (PIL, in memory, ``quality=95`` by default) and use
    minus / plus the file size in kilobytes (``bytes / 1000``). Not differentiable.
``colorfulness``
    Hasler & Süsstrunk (2003), "Measuring colourfulness in natural images". With ``R, G, B`` in
    0..255 units, ``rg = R - G`` and ``yb = (R + G) / 2 - B``, over the pixels of one image::

        M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

    (population standard deviations). The paper's bands: ~0 not colourful, 15 slightly, 33
    moderately, 45 averagely, 59 quite, 82 highly, 109 extremely colourful. A tiny ``eps``
    inside each square root keeps the gradient finite on grey images.
``saturation``
    Mean HSV saturation, ``(max(R,G,B) - min(R,G,B)) / (max(R,G,B) + eps)`` per pixel, in
    ``[0, 1]``. Differentiable almost everywhere (sub-gradients of max/min).
``brightness``
    Closeness of the mean Rec. 709 luma ``Y = 0.2126 R + 0.7152 G + 0.0722 B`` to a target:
    ``-|mean(Y) - target|`` (``target=0.5`` by default), in ``[-1, 0]``.
``contrast``
    RMS contrast, the standard deviation of the luma ``Y`` over the image, in ``[0, 0.5]``.
"""
from __future__ import annotations

import io
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "JpegCompressibility",
    "JpegIncompressibility",
    "Colorfulness",
    "Saturation",
    "Brightness",
    "Contrast",
    "WEIGHT_FREE_REWARDS",
    "make_weight_free",
]

_LUMA = (0.2126, 0.7152, 0.0722)


def _check_images(images: torch.Tensor, prompts: Optional[Sequence[str]]) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(
            f"images must be [N, H, W, 3] or [N, T, H, W, 3], got shape {tuple(images.shape)}"
        )
    if prompts is not None and not isinstance(prompts, str) and len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")


def _per_frame(images: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``score`` (``[M, H, W, 3] -> [M]``) to images or to every frame of a video batch."""
    if images.dim() == 4:
        return score(images)
    n, t = images.shape[:2]
    frames = images.reshape(n * t, *images.shape[2:])
    return score(frames).reshape(n, t).mean(dim=1)


class _WeightFreeReward:
    name: str = "weight_free"
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                 grad: bool = False) -> torch.Tensor:
        """``grad=True`` asks for a score differentiable w.r.t. the pixels (an error if it is not);
        these scorers never disable autograd, so ``grad=False`` changes nothing."""
        if grad and not self.differentiable:
            raise ValueError(f"{self.name}: this reward is not differentiable; call it with grad=False.")
        _check_images(images, prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return _per_frame(images, self._score).to(torch.float32)

    def _score(self, images: torch.Tensor) -> torch.Tensor:  # [M, H, W, 3] -> [M]
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------- JPEG ---


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kilobytes (``bytes / 1000``) of each image of ``[M, H, W, 3]`` in ``[0, 1]``."""
    pixels = (images.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round()
    pixels = pixels.to(torch.uint8).numpy()
    sizes = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(_WeightFreeReward):
    """Minus the JPEG size in kB (DDPO): higher is more compressible. Not differentiable."""

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quality={self.quality})"


class JpegIncompressibility(JpegCompressibility):
    """Plus the JPEG size in kB (DDPO): higher is less compressible. Not differentiable."""

    name = "jpeg_incompressibility"

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)


# ------------------------------------------------------------------------ differentiable ---


class Colorfulness(_WeightFreeReward):
    """Hasler–Süsstrunk colourfulness ``M`` in 0..255 pixel units (see the module docstring)."""

    name = "colorfulness"
    differentiable = True

    def __init__(self, eps: float = 1e-6):
        self.eps = float(eps)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * 255.0
        r, g, b = x[..., 0].flatten(1), x[..., 1].flatten(1), x[..., 2].flatten(1)
        rg = r - g
        yb = 0.5 * (r + g) - b
        std_rg = rg.var(dim=1, unbiased=False)
        std_yb = yb.var(dim=1, unbiased=False)
        sigma = torch.sqrt(std_rg + std_yb + self.eps)
        mu = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + self.eps)
        return sigma + 0.3 * mu


class Saturation(_WeightFreeReward):
    """Mean HSV saturation in ``[0, 1]``: ``(max - min) / (max + eps)`` per pixel."""

    name = "saturation"
    differentiable = True

    def __init__(self, eps: float = 1e-4):
        self.eps = float(eps)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).clamp(0.0, 1.0)
        mx = x.amax(dim=-1)
        mn = x.amin(dim=-1)
        return ((mx - mn) / (mx + self.eps)).flatten(1).mean(dim=1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=torch.float32, device=images.device)
    return (images.to(torch.float32) * w).sum(dim=-1)


class Brightness(_WeightFreeReward):
    """``-|mean luma - target|`` in ``[-1, 0]`` (Rec. 709 luma)."""

    name = "brightness"
    differentiable = True

    def __init__(self, target: float = 0.5):
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"brightness target must be in [0, 1], got {target}")
        self.target = float(target)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return -(_luma(images).flatten(1).mean(dim=1) - self.target).abs()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target})"


class Contrast(_WeightFreeReward):
    """RMS contrast: the population standard deviation of Rec. 709 luma, in ``[0, 0.5]``."""

    name = "contrast"
    differentiable = True

    def __init__(self, eps: float = 1e-8):
        self.eps = float(eps)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(_luma(images).flatten(1).var(dim=1, unbiased=False) + self.eps)


# ----------------------------------------------------------------------------- registry ---

WEIGHT_FREE_REWARDS: Dict[str, type] = {
    cls.name: cls
    for cls in (JpegCompressibility, JpegIncompressibility, Colorfulness, Saturation, Brightness, Contrast)
}


def make_weight_free(name: str, **kwargs):
    """Instantiate the weight-free reward registered under ``name`` with ``kwargs``."""
    try:
        cls = WEIGHT_FREE_REWARDS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(WEIGHT_FREE_REWARDS))
        raise ValueError(f"unknown weight-free reward {name!r}; valid names: {valid}") from None
    return cls(**kwargs)
