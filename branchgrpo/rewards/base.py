"""The interface every scorer implements, and the shared machinery of the model-based ones.

Interface
---------
``reward(images, prompts) -> scores``:

- ``images``: ComfyUI's IMAGE layout, ``[N, H, W, 3]`` floats in ``[0, 1]``; or video leaves
  ``[N, T, H, W, 3]`` (see *Video* below).
- ``prompts``: one string for every image, or a sequence of ``N`` strings.
- returns a float32 tensor ``[N]`` (one score per image or video), on the images' device.
- ``reward.name`` (str) names it in logs and metrics; ``reward.differentiable`` (bool) says whether
  the score is a differentiable function of the pixels. A differentiable model scorer called with
  ``grad=True`` keeps the autograd graph from the pixels to the score (its own weights stay frozen);
  by default (``grad=False``) it runs under ``torch.no_grad``.

Video
-----
Image scorers score video leaves frame by frame: ``[N, T, H, W, 3]`` becomes ``N*T`` images with
each prompt repeated ``T`` times (at most ``max_frames`` frames, taken evenly spaced, when set),
and the frame scores are aggregated per video by :func:`aggregate_video`::

    score = mean_t s_t + temporal_weight * (1 - mean_t mean_pixels |x_{t+1} - x_t|)

The temporal term is VBench's *temporal flickering* score (1 minus the mean absolute difference of
consecutive frames, pixels in ``[0, 1]``, so the term is in ``[0, 1]``): 1 for a still video, lower
for flicker. ``temporal_weight = 0`` (the default) is the plain mean of frame scores.

Model scorers
-------------
:class:`ModelReward` implements the interface for scorers backed by torch modules: input checks,
prompt broadcasting, the video path, batching (``batch_size`` images per forward), grad / no-grad,
moving inputs to the device and dtype of the model's weights (so whoever moves the weights, e.g.
ComfyUI's model management, decides the device), and float32 scores back on the caller's device.
A subclass implements ``_score(pixels, prompts)`` on one batch, and lists its torch modules in
``modules()``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "Reward", "ModelReward", "Prompts", "check_images", "prompt_list", "aggregate_video",
    "temporal_flicker_score", "select_frames", "clip_preprocess", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
]

Prompts = Union[str, Sequence[str], None]

# CLIP's normalisation (OpenAI), also used by ImageReward, HPS-v2.1, PickScore and the LAION aesthetic.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores ``[N]`` for images ``[N, H, W, 3]`` (or ``[N, T, H, W, 3]``) and their prompts."""


def check_images(images: torch.Tensor, where: str = "reward") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(f"{where}: images must be [N, H, W, 3] or [N, T, H, W, 3] (ComfyUI IMAGE layout, "
                         f"RGB in [0, 1]), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{where}: images must be floats in [0, 1], got dtype {images.dtype}")


def prompt_list(prompts: Prompts, n: int, where: str = "reward") -> List[str]:
    """``prompts`` as a list of ``n`` strings: one string is repeated; None means empty prompts."""
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = [str(p) for p in prompts]
    if len(prompts) == 1 and n != 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"{where}: got {len(prompts)} prompts for {n} images; give one prompt per image "
                         "or a single prompt for all.")
    return prompts


def select_frames(t: int, max_frames: Optional[int]) -> torch.Tensor:
    """Indices of at most ``max_frames`` evenly spaced frames out of ``t`` (first and last kept)."""
    if not max_frames or max_frames >= t:
        return torch.arange(t)
    if max_frames == 1:
        return torch.tensor([t // 2])
    return torch.linspace(0, t - 1, max_frames).round().long().unique()


def temporal_flicker_score(videos: torch.Tensor) -> torch.Tensor:
    """``1 - mean |x_{t+1} - x_t|`` per video of ``[N, T, H, W, 3]`` in ``[0, 1]``; 1 for ``T < 2``."""
    if videos.shape[1] < 2:
        return torch.ones(videos.shape[0], dtype=torch.float32, device=videos.device)
    diff = (videos[:, 1:].float() - videos[:, :-1].float()).abs()
    return 1.0 - diff.flatten(1).mean(dim=1)


def aggregate_video(frame_scores: torch.Tensor, videos: Optional[torch.Tensor] = None,
                    temporal_weight: float = 0.0) -> torch.Tensor:
    """Per-video score from ``frame_scores [N, T]``: the mean over frames, plus
    ``temporal_weight * temporal_flicker_score(videos)`` when the weight is not zero."""
    score = frame_scores.float().mean(dim=1)
    if temporal_weight:
        if videos is None:
            raise ValueError("aggregate_video: temporal_weight needs the videos")
        score = score + float(temporal_weight) * temporal_flicker_score(videos).to(score.device)
    return score


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD, crop: bool = True) -> torch.Tensor:
    """CLIP-style preprocessing on tensors, differentiable: ``[M, H, W, 3]`` in ``[0, 1]`` ->
    ``[M, 3, size, size]``. Resizes the shorter side to ``size`` (bicubic, antialiased, as PIL's
    bicubic resize of the reference pipelines), centre-crops, clamps to ``[0, 1]``, normalises."""
    x = images.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if crop:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh, nw = size, size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    if crop and (nh, nw) != (size, size):
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ModelReward:
    """Base of the scorers backed by torch modules (see the module docstring).

    Subclasses set ``name`` and implement :meth:`_score` and :meth:`modules`. Constructor
    arguments common to all: ``batch_size`` (images per forward pass), ``max_frames`` and
    ``temporal_weight`` (video leaves, see :func:`aggregate_video`).
    """

    name: str = "model_reward"
    differentiable: bool = True

    def __init__(self, batch_size: int = 8, max_frames: Optional[int] = None, temporal_weight: float = 0.0):
        if int(batch_size) < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        if max_frames is not None and int(max_frames) < 1:
            raise ValueError(f"{self.name}: max_frames must be >= 1 or None, got {max_frames}")
        if not math.isfinite(float(temporal_weight)):
            raise ValueError(f"{self.name}: temporal_weight must be finite, got {temporal_weight}")
        self.batch_size = int(batch_size)
        self.max_frames = int(max_frames) if max_frames else None
        self.temporal_weight = float(temporal_weight)

    # -- to implement -------------------------------------------------------------------------
    def modules(self) -> List[torch.nn.Module]:
        """The torch modules holding the weights (for device management)."""
        raise NotImplementedError

    def _score(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """``[M, H, W, 3]`` float32 on :attr:`device` and ``M`` prompts -> scores ``[M]``. Preprocess in
        float32, then cast to :attr:`dtype` for the model."""
        raise NotImplementedError

    # -- common -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for m in self.modules():
            for p in m.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for m in self.modules():
            for p in m.parameters():
                return p.dtype
        return torch.float32

    def to(self, device=None, dtype=None) -> "ModelReward":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    def __call__(self, images: torch.Tensor, prompts: Prompts = None, grad: bool = False) -> torch.Tensor:
        check_images(images, self.name)
        if grad and not self.differentiable:
            raise ValueError(f"{self.name}: this reward is not differentiable; call it with grad=False.")
        n = images.shape[0]
        prompts = prompt_list(prompts, n, self.name)
        out_device = images.device
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=out_device)
        videos = None
        if images.dim() == 5:
            videos = images[:, select_frames(images.shape[1], self.max_frames).to(images.device)]
            t = videos.shape[1]
            frames = videos.reshape(n * t, *videos.shape[2:])
            frame_prompts = [p for p in prompts for _ in range(t)]
        else:
            frames, frame_prompts = images, prompts
        with torch.set_grad_enabled(grad):
            scores = self._score_batched(frames, frame_prompts)
            if videos is not None:
                scores = aggregate_video(scores.reshape(n, -1), videos.to(scores.device), self.temporal_weight)
        return scores.to(device=out_device, dtype=torch.float32)

    def _score_batched(self, frames: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        device = self.device
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            px = frames[i:i + self.batch_size].to(device=device, dtype=torch.float32)
            out.append(self._score(px, prompts[i:i + self.batch_size]).float().reshape(-1))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter gradients (scorers are never trained)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def iter_unique(modules: Iterable[torch.nn.Module]) -> List[torch.nn.Module]:
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out
