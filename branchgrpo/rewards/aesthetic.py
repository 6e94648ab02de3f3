"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", 2022).

Structure: CLIP ViT-L/14 image embedding (768-d, OpenAI's model; transformers' ``CLIPModel`` of
``openai/clip-vit-large-patch14`` gives the same embedding) -> L2 normalisation -> MLP
768-1024-128-64-16-1 (dropouts, no activations: the ``linearMSE`` checkpoint). Score: a rating on
the AVA scale, about 1 .. 10 (typically 4 .. 7 for generated images), higher is better.
The prompt is ignored. Differentiable.

Loading (:func:`load_aesthetic`), local only: the MLP from ``sac+logos+ava1-l14-linearMSE.pth``
(``torch.load(weights_only=True)``, or a ``.safetensors`` conversion; keys ``layers.{0,2,4,6,7}``,
checked strictly; the input width is read from the file) and the CLIP folder through
:func:`branchgrpo.rewards.clip_models.load_clip_folder` (shared with CLIP score). The MLP runs in
float32 whatever the CLIP dtype.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelReward, clip_preprocess, frozen
from .clip_models import _embeds, load_clip_folder, read_preprocess_config
from .files import PathLike, RewardLoadError, find_file, find_folder, load_state_dict_file, load_state_dict_strict

__all__ = ["AestheticMLP", "AestheticScorer", "load_aesthetic"]


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (layer indices match its checkpoints)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScorer(ModelReward):
    name = "aesthetic"
    differentiable = True

    def __init__(self, clip, mlp: AestheticMLP, image_size: int = 224, mean=OPENAI_CLIP_MEAN,
                 std=OPENAI_CLIP_STD, **kwargs):
        super().__init__(**kwargs)
        self.clip = frozen(clip)
        self.mlp = frozen(mlp.float())
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def modules(self) -> List[torch.nn.Module]:
        return [self.clip, self.mlp]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    def _score(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        x = clip_preprocess(pixels, self.image_size, self.mean, self.std).to(self.dtype)
        emb = _embeds(self.clip.get_image_features(pixel_values=x)).float()
        mlp_device = next(self.mlp.parameters()).device
        return self.mlp(F.normalize(emb, dim=-1).to(mlp_device)).reshape(-1).to(pixels.device)

    def to(self, device=None, dtype=None) -> "AestheticScorer":
        self.clip.to(device=device, dtype=dtype)
        self.mlp.to(device=device)
        return self


def load_aesthetic(checkpoint: Optional[PathLike] = None, clip: Optional[PathLike] = None, *, search_dirs=None,
                   device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                   where: str = "LAION aesthetic", **kwargs) -> AestheticScorer:
    """The aesthetic predictor from local files (see the module docstring). ``clip``: the CLIP ViT-L/14
    folder (a path, a folder name in ``search_dirs``, ``hf:<repo>``, or None for the default)."""
    path = find_file("aesthetic", checkpoint, search_dirs, where)
    clip_dir = find_folder("clip", clip, search_dirs, where + " (CLIP ViT-L/14 image encoder)")
    sd = load_state_dict_file(path, where)
    w0 = sd.get("layers.0.weight")
    if w0 is None or w0.dim() != 2:
        raise RewardLoadError(f"{where}: {path.name} is not an aesthetic MLP checkpoint (no layers.0.weight); "
                              f"keys: {sorted(sd)[:8]}")
    mlp = load_state_dict_strict(AestheticMLP(int(w0.shape[1])), sd, f"{where}: {path.name}")
    clip_model = load_clip_folder(clip_dir, device, dtype, where)
    proj = int(clip_model.config.projection_dim)
    if proj != mlp.input_size:
        raise RewardLoadError(f"{where}: the MLP expects {mlp.input_size}-d CLIP embeddings but {clip_dir} gives "
                              f"{proj}-d; use CLIP ViT-L/14 (openai/clip-vit-large-patch14).")
    size, mean, std = read_preprocess_config(clip_dir)
    return AestheticScorer(clip_model, mlp.to(device), image_size=size, mean=mean, std=std, **kwargs)
