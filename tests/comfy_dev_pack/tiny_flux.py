"""Tiny random-weight flow model for the tests (NOT a real model: it generates noise-like images).

A test fixture, not a user's node: it is part of the test suite's own custom-node folder (``tests/comfy_dev_pack``),
which only the test server links into ``custom_nodes/``.

FLUX cannot be built small through the stock ``UNETLoader``: ComfyUI's model detection hard-codes
24 heads and axes_dim [16, 56, 56], which forces hidden_size 3072. This node builds FLUX from an
explicit tiny ``unet_config`` instead, fills every weight from a seed (ComfyUI leaves them
``torch.empty``), and returns a normal MODEL (a ``ModelPatcher`` over ``model_base.Flux``), so stock
nodes (KSampler, LoraLoaderModelOnly, ModelSave, ...) and the BranchGRPO Trainer take it as any FLUX.

Its text widths match what the stock ``CLIPLoader(type="sd3")`` gives with a single CLIP-L file:
context [B, 77, 4096] (``context_in_dim`` 4096) and pooled [B, 2048] (``vec_in_dim`` 2048), so
``CLIPLoader -> CLIPTextEncode -> KSampler`` (or the Trainer) works end to end.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
from bench.families import build_with_core_defaults
from tiny_models import init_tensor

from . import CATEGORY

NODE = "Tiny Random Flow Model"
RANDOM = "(seeded random init)"

# FLUX-dev style (guidance embedding on); sum(axes_dim) == hidden_size / num_heads.
TINY_CONFIGS: dict[str, dict] = {
    "flux": {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
             "vec_in_dim": 2048, "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
             "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
             "guidance_embed": True},
}


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def build_tiny_model(family: str, seed: int, weights_path: str | None = None):
    """A ``ModelPatcher`` over a tiny ``model_base`` of ``family``: seeded random weights, or the
    weights of ``weights_path`` (a .safetensors of the same tiny config, with or without the
    ``diffusion_model.`` / ``model.diffusion_model.`` prefix)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"{NODE}: family — {family!r} is not one of {sorted(TINY_CONFIGS)}.")
    def make(cfg):
        model_config = comfy.model_detection.model_config_from_unet_config(cfg)
        model_config.set_inference_dtype(torch.float32, None)
        return model_config.get_model({})

    with torch.inference_mode(False):
        base = build_with_core_defaults(make, TINY_CONFIGS[family])
        dm = base.diffusion_model
        expected = dm.state_dict()
        if weights_path:
            sd = _strip_prefix(comfy.utils.load_torch_file(weights_path, safe_load=True))
            missing = sorted(set(expected) - set(sd))
            unexpected = sorted(set(sd) - set(expected))
            wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
            if missing or unexpected or wrong:
                raise ValueError(
                    f"{NODE}: weights — {os.path.basename(weights_path)} is not a tiny {family} of this node's "
                    f"config ({len(missing)} missing keys e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                    f"{unexpected[:2]}, {len(wrong)} with other shapes e.g. {wrong[:2]}). Pick "
                    f"'{RANDOM}' or a file saved from this node's model (e.g. with the stock ModelSave).")
            sd = {k: v.to(torch.float32) for k, v in sd.items()}
        else:
            sd = {k: init_tensor(k, tuple(v.shape), seed) for k, v in expected.items()}
        dm.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class TinyFlowModelLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTinyFlowModelLoader", display_name="Tiny Random Flow Model (tests/demo)",
            category=CATEGORY, is_experimental=True,
            description="For tests only (the test suite's custom-node folder): builds a TINY "
                        "flow-matching model with RANDOM weights (not a real model; it generates noise-like "
                        "images). 'flux' is a FLUX-dev-style model (guidance embedding on, 0.6 M parameters) that "
                        "the stock UNETLoader cannot build small. Its text inputs match the stock CLIPLoader with "
                        "type 'sd3' (context 4096, pooled 2048) and its latent is 16 channels (Empty SD3 Latent "
                        "Image). Trains in seconds on a CPU.",
            inputs=[
                io.Combo.Input("family", options=list(TINY_CONFIGS), default="flux",
                               tooltip="Model family to build (flux: hidden 64, 1 double + 1 single block, "
                                       "2 heads, guidance embed). SD3 and Wan 2.1 tiny models load through the "
                                       "stock UNETLoader instead."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights: the same seed always gives the same model, "
                                     "so a LoRA trained on it can be reproduced."),
                io.Combo.Input("weights", options=[RANDOM] + folder_paths.get_filename_list("diffusion_models"),
                               default=RANDOM, optional=True,
                               tooltip="Optional .safetensors in models/diffusion_models with the weights of this "
                                       "same tiny config (e.g. written by the stock ModelSave from this node); "
                                       "overrides the seed. Default: seeded random weights."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The tiny random-weight MODEL (not a real "
                                                                   "model; for tests and demos).")],
        )

    @classmethod
    def execute(cls, family, seed, weights=RANDOM) -> io.NodeOutput:
        path = None
        if weights and weights != RANDOM:
            path = folder_paths.get_full_path("diffusion_models", weights)
            if path is None:
                raise ValueError(f"{NODE}: weights — {weights!r} not found in models/diffusion_models.")
        return io.NodeOutput(build_tiny_model(family, seed, path))
