"""HPS v2.1 (Human Preference Score v2.1, Wu et al., 2023) on open_clip.

Structure: open_clip ViT-H-14 (224 px, OpenAI mean/std, bicubic resize + centre crop) fine-tuned on
human preferences. Score = cosine of the L2-normalised image and text embeddings (what HPSv2's
scorer returns); typically 0.2 .. 0.35 for generated images, higher is better. Differentiable.

Loading (:func:`load_hps`), local only: ``open_clip.create_model('ViT-H-14', pretrained=None)``
builds the architecture (no weights are fetched), then the official ``HPS_v2.1_compressed.pt``
(xswu/HPSv2; its ``state_dict`` entry, 686 tensors) is read with ``torch.load(weights_only=True)``
(or a ``.safetensors`` conversion) and loaded with every key checked. The tokenizer is open_clip's
own (the CLIP BPE vocabulary ships inside open-clip-torch). The ``hpsv2`` package is not used: its
1.2.0 wheel lacks the tokenizer vocabulary and its scorer downloads 3.9 GB.

``arch`` may name any open_clip architecture, including one registered in-process with
``open_clip.add_model_config`` (the tests use a tiny one).
"""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional, Union

import torch

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelReward, clip_preprocess, frozen
from .files import (PathLike, RewardLoadError, check_state_dict_keys, find_file, load_state_dict_file,
                    skip_init)

__all__ = ["OpenCLIPScorer", "load_hps", "build_open_clip"]

HPS_ARCH = "ViT-H-14"


def _image_cfg(model) -> tuple:
    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return size, tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("std", OPENAI_CLIP_STD))


class OpenCLIPScorer(ModelReward):
    """Cosine similarity of open_clip image and text embeddings (HPS v2.1 with its checkpoint)."""

    name = "hps_v2.1"
    differentiable = True

    def __init__(self, model, tokenizer, name: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.model = frozen(model)
        self.tokenizer = tokenizer
        if name:
            self.name = name
        self.image_size, self.mean, self.std = _image_cfg(model)

    def modules(self) -> List[torch.nn.Module]:
        return [self.model]

    def _score(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        x = clip_preprocess(pixels, self.image_size, self.mean, self.std).to(self.dtype)
        tokens = self.tokenizer(prompts).to(pixels.device)
        img = self.model.encode_image(x, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        return (img.float() * txt.float()).sum(dim=-1)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip logs 'initialized randomly' on the root logger; our weights are loaded right after."""
    f = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("HPS v2.1 needs open-clip-torch (pip install open-clip-torch; see requirements.txt)") from e
    return open_clip


def build_open_clip(arch: str = HPS_ARCH, meta: bool = False):
    """An open_clip model of architecture ``arch`` with no weights loaded (and none fetched); on the meta
    device (no memory) with ``meta=True``."""
    open_clip = _open_clip()
    if open_clip.get_model_config(arch) is None:
        raise RewardLoadError(f"open_clip has no architecture {arch!r}")
    device = "meta" if meta else "cpu"
    with skip_init(), _quiet_random_init_warning(), torch.device(device):
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, pretrained_image=False,
                                       pretrained_text=False, device=device, precision="fp32")
    return model, open_clip.get_tokenizer(arch)


def load_hps(checkpoint: Optional[PathLike] = None, *, search_dirs=None, arch: str = HPS_ARCH,
             device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
             where: str = "HPS v2.1", **kwargs) -> OpenCLIPScorer:
    """Load HPS v2.1 from a local ``HPS_v2.1_compressed.pt`` (see the module docstring)."""
    path = find_file("hps_v2.1", checkpoint, search_dirs, where)
    _open_clip()  # ImportError with the install hint before reading the file
    sd = load_state_dict_file(path, where)
    # keys and shapes checked against a meta-device copy first: a wrong file fails before 4 GB are allocated
    check_state_dict_keys(build_open_clip(arch, meta=True)[0], sd, f"{where}: {path.name} (architecture {arch})")
    model, tokenizer = build_open_clip(arch)
    model.load_state_dict(sd, strict=True)
    model.to(device=device, dtype=dtype)
    return OpenCLIPScorer(model, tokenizer, **kwargs)
