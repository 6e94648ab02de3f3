"""What ComfyUI's stock nodes and the Trainer need from a CLIP and a VAE, for models that bring their own.

The CPU demo's model (``nodes/demo_model.py``) has a text encoder that is a lookup and a VAE that is pixel space;
the test suite's tiny families (``tests/comfy_dev_pack``) have random ones. Both are these shims: a subclass gives
``tokenize`` and ``encode_from_tokens`` (a CLIP), or ``decode`` and ``encode`` (a VAE); the rest of the protocol
(``CLIPTextEncode``, ``CLIPSetLastLayer``, LoRA loaders, ``VAEDecode`` / ``VAEEncode``, tiled variants) is here.

Only torch is imported, so the test pack can load this file by its path.
"""
from __future__ import annotations

import torch


class TextEncoderShim:
    """A CLIP without weights: ``encode_from_tokens(tokens, return_pooled, return_dict)`` is the subclass's."""

    def __init__(self):
        self.cond_stage_model = torch.nn.Module()  # no weights: a CLIP LoRA has nothing to patch
        self.patcher = None

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        raise NotImplementedError

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        raise NotImplementedError

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict=None,
                                     show_pbar: bool = True) -> list:
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        return [[cond, {**out, **(add_dict or {})}]]

    def encode(self, text: str):
        return self.encode_from_tokens(self.tokenize(text))

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return []  # no weights to patch: a LoRA's text-encoder part does nothing here

    def clip_layer(self, layer_idx):
        pass  # one "layer": CLIP Set Last Layer has nothing to change

    def add_hooks_to_dict(self, pooled_dict):
        return pooled_dict

    def load_model(self):
        return None

    def get_sd(self):
        return {}


class VAEShim:
    """A VAE without a network of ComfyUI's: ``decode(latent) -> IMAGE`` and ``encode(IMAGE) -> latent`` are the
    subclass's; it lives on the CPU."""

    latent_dim = 2
    output_channels = 3
    vae_dtype = torch.float32

    def __init__(self, latent_channels: int, downscale: int):
        self.latent_channels = int(latent_channels)
        self.downscale_ratio = self.upscale_ratio = int(downscale)
        self.device = self.output_device = torch.device("cpu")

    def decode(self, samples: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def decode_tiled(self, samples, *args, **kwargs):
        return self.decode(samples)

    def encode_tiled(self, pixels, *args, **kwargs):
        return self.encode(pixels)

    def spacial_compression_decode(self):
        return 1

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def get_sd(self):
        return {}
