"""Development nodes: tiny random-weight stand-ins for one flow-model family's model, text encoder and VAE.

Part of the test suite's own custom-node folder (``tests/comfy_dev_pack``), which only the test server links into
``custom_nodes/``; a registry install of the pack never has them. They exist so that every flow family ComfyUI 0.3.75
supports can be trained end to end on a CPU in seconds:

* **Tiny Family Model**: builds ``model_base.<Family>`` from ComfyUI's own model config class
  (``comfy.supported_models.<Config>``) with a tiny ``unet_config`` (one block per block list, hidden 64-128),
  fills every weight from a seed (ComfyUI leaves them ``torch.empty``) and returns a normal MODEL. Saved with
  the stock ModelSave, the families whose detection reads every size from the weights
  (:data:`DETECTABLE`) load back through the stock UNETLoader.
* **Tiny Text Encoder**: a CLIP whose CONDITIONING is a seeded random ``[1, tokens, width]`` per prompt
  (plus ``pooled_output``, an all-ones ``attention_mask`` and HiDream's ``conditioning_llama3`` where a family
  reads them): the shapes the
  family's real text encoder would give, at a tiny width. It has no weights, so a LoRA's text part does nothing.
* **Tiny VAE**: decodes a latent of any channel count (image ``[B, C, H, W]`` or video ``[B, C, T, H, W]``) to
  RGB ``[B, (T,) H, W, 3]`` by a fixed random channel mix and a sigmoid (no upsampling); encodes by area
  resizing and the mix's pseudo-inverse. Enough for a reward to score and for reference-latent nodes.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from comfy_api.latest import io

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from bench.families import build_with_core_defaults
from tiny_models import init_tensor

from . import CATEGORY, product_module

_shims = product_module("nodes/shims.py")

_FLUX_BASE = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
              "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True}
_HUNYUAN_BASE = {"image_model": "hunyuan_video", "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0,
                 "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
                 "guidance_embed": False, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
                 "vision_in_dim": None}
_LUMINA_BASE = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                "axes_dims": [8, 12, 12], "multiple_of": 16}

# family -> (ComfyUI model config class in comfy.supported_models, tiny unet_config)
FAMILIES: dict[str, tuple[str, dict]] = {
    "flux": ("Flux", {**_FLUX_BASE, "guidance_embed": True}),
    "flux_schnell": ("FluxSchnell", {**_FLUX_BASE, "guidance_embed": False}),
    "flux2": ("Flux2", {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1,
                        "vec_in_dim": None, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2,
                        "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 8, 8, 8], "theta": 2000,
                        "qkv_bias": False, "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True,
                        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32,
                          "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                          "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                          "out_dim": 64, "hidden_dim": 64, "n_layers": 1}),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
                                 "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                                 "axes_dims_rope": (8, 12, 12), "patch_size": 2}),
    # Mochi's block asserts an x-MLP width of 1536 * 8: hidden 64 x ratio 192 (the only large layer).
    "mochi": ("GenmoMochi", {"image_model": "mochi_preview", "depth": 1, "patch_size": 2, "num_heads": 2,
                             "hidden_size_x": 64, "hidden_size_y": 32, "mlp_ratio_x": 192.0, "mlp_ratio_y": 2.0,
                             "learn_sigma": False, "in_channels": 12, "qk_norm": True, "qkv_bias": False,
                             "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
                             "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False,
                             "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 32, "t5_token_length": 8,
                             "rope_theta": 10000.0}),
    "ltxv": ("LTXV", {"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                      "cross_attention_dim": 32, "caption_channels": 32, "in_channels": 128}),
    "lumina2": ("Lumina2", {**_LUMINA_BASE, "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
                            "ffn_dim_multiplier": 4.0}),
    # Z-Image's timestep embedding is 256 wide and its blocks read min(dim, 256): dim 256 (2 heads of 128).
    "z_image": ("ZImage", {**_LUMINA_BASE, "dim": 256, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
                           "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
                           "time_scale": 1000.0, "pad_tokens_multiple": 32}),
    "auraflow": ("AuraFlow", {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2,
                              "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 2048,
                              "max_seq": 64}),
    "chroma_radiance": ("ChromaRadiance", {"image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3,
                                           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
                                           "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
                                           "theta": 10000, "patch_size": 16, "qkv_bias": True, "in_dim": 64,
                                           "out_dim": 64, "hidden_dim": 64, "n_layers": 1, "nerf_hidden_size": 16,
                                           "nerf_mlp_ratio": 2, "nerf_depth": 1, "nerf_max_freqs": 4,
                                           "nerf_tile_size": 0, "nerf_final_head_type": "conv",
                                           "nerf_embedder_dtype": None}),
    "omnigen2": ("Omnigen2", {"image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [1024, 1664, 1664],
                              "ffn_dim_multiplier": None, "hidden_size": 64, "in_channels": 16, "multiple_of": 16,
                              "norm_eps": 1e-5, "num_attention_heads": 2, "num_kv_heads": 2, "num_layers": 1,
                              "num_refiner_layers": 1, "out_channels": None, "patch_size": 2, "text_feat_dim": 32,
                              "timestep_scale": 1000.0}),
    # HiDream reads a T5 stream (context) and one Llama-3 hidden state per block (conditioning_llama3).
    "hidream": ("HiDream", {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                            "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32,
                            "num_attention_heads": 2, "caption_channels": [32, 32], "text_emb_dim": 32,
                            "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": (16, 8, 8),
                            "max_resolution": (16, 16), "llama_layers": [0, 1]}),
    # Refused by the Trainer (a 3D-shape model): here to test that refusal.
    "hunyuan3d2": ("Hunyuan3Dv2", {"image_model": "hunyuan3d2", "in_channels": 64, "context_in_dim": 32,
                                   "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
                                   "depth_single_blocks": 1, "qkv_bias": True, "guidance_embed": False}),
    # The families below are also what the stock UNETLoader detects from a saved file of these sizes
    # (model_detection reads every size from the weights; heads = hidden // 128).
    "hunyuan_video": ("HunyuanVideo", {**_HUNYUAN_BASE, "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
                                       "vec_in_dim": 768, "axes_dim": [16, 56, 56], "guidance_embed": True}),
    "hunyuan_video15": ("HunyuanVideo15", {**_HUNYUAN_BASE, "in_channels": 65, "out_channels": 32,
                                           "patch_size": [1, 1, 1], "vec_in_dim": None, "axes_dim": [16, 56, 56],
                                           "use_cond_type_embedding": True, "vision_in_dim": 1152}),
    "hunyuan_image21": ("HunyuanImage21", {**_HUNYUAN_BASE, "in_channels": 64, "out_channels": 64,
                                           "patch_size": [1, 1], "vec_in_dim": None, "axes_dim": [64, 64]}),
    "wan22": ("WAN22_T2V", {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 48, "in_dim": 48,
                            "num_heads": 1, "ffn_dim": 256, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256,
                            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
                            "text_dim": 4096}),
}
DETECTABLE = ("hunyuan_video", "hunyuan_video15", "hunyuan_image21", "wan22")


def build_family_model(family: str, seed: int = 0):
    """A ``ModelPatcher`` over a tiny random ``model_base`` of ``family`` (see :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"Tiny Family Model: family — {family!r} is not one of {sorted(FAMILIES)}.")
    config_name, unet_config = FAMILIES[family]
    config_cls = getattr(comfy.supported_models, config_name, None)
    if config_cls is None:
        raise ValueError(f"Tiny Family Model: family — this ComfyUI has no comfy.supported_models.{config_name} "
                         "(the pack's tiny families follow ComfyUI 0.3.75).")
    def make(cfg):
        model_config = config_cls(cfg)
        model_config.set_inference_dtype(torch.float32, None)
        return model_config.get_model({})

    with torch.inference_mode(False):
        base = build_with_core_defaults(make, unet_config)
        dm = base.diffusion_model
        sd = {k: init_tensor(k, tuple(v.shape), seed) for k, v in dm.state_dict().items()}
        dm.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class TinyTextEncoder(_shims.TextEncoderShim):
    """What CLIPTextEncode and the BranchGRPO Trainer need from a CLIP (``tokenize``,
    ``encode_from_tokens_scheduled``): each prompt maps to a seeded random ``[1, tokens, width]``."""

    def __init__(self, width: int, tokens: int, pooled_width: int, attention_mask: bool, seed: int,
                 llama3_layers: int = 0):
        super().__init__()
        self.width, self.tokens, self.pooled_width = int(width), int(tokens), int(pooled_width)
        self.attention_mask, self.seed, self.llama3_layers = bool(attention_mask), int(seed), int(llama3_layers)

    def clone(self):
        return TinyTextEncoder(self.width, self.tokens, self.pooled_width, self.attention_mask, self.seed,
                               self.llama3_layers)

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"tiny": [[(" ".join(str(text).split()), 1.0)]]}

    def _gen(self, text: str, salt: str) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1000003 + zlib.crc32((salt + text).encode())) % (2 ** 63))

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        texts = [tok[0] for batch in tokens["tiny"] for tok in batch]
        cond = torch.cat([torch.randn(1, self.tokens, self.width, generator=self._gen(t, "c")) for t in texts])
        pooled = None
        if self.pooled_width > 0:
            pooled = torch.cat([torch.randn(1, self.pooled_width, generator=self._gen(t, "p")) for t in texts])
        if return_dict:
            out = {"cond": cond, "pooled_output": pooled}
            if self.attention_mask:
                out["attention_mask"] = torch.ones(len(texts), self.tokens, dtype=torch.long)
            if self.llama3_layers > 0:  # HiDream: [B, layers, tokens, width]
                out["conditioning_llama3"] = torch.cat([
                    torch.randn(1, self.llama3_layers, self.tokens, self.width, generator=self._gen(t, "l"))
                    for t in texts])
            return out
        return (cond, pooled) if return_pooled else cond


class TinyVAE(_shims.VAEShim):
    """Latent (any channel count, image or video) <-> RGB by a fixed random channel mix; no up/downsampling in
    decode, ``downscale`` x area resize in encode."""

    def __init__(self, channels: int, downscale: int = 8, seed: int = 0, video: bool = False):
        super().__init__(latent_channels=channels, downscale=downscale)
        self.video = bool(video)
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(3, self.latent_channels, generator=g) / math.sqrt(self.latent_channels)

    def decode(self, samples: torch.Tensor, **kwargs) -> torch.Tensor:
        x = samples.detach().float().cpu()
        if x.dim() not in (4, 5) or x.shape[1] != self.latent_channels:
            raise ValueError(f"Tiny VAE: decode — expected a latent [B, {self.latent_channels}, (T,) H, W], got "
                             f"{tuple(x.shape)}; set the node's channels to the model's latent channels.")
        rgb = torch.sigmoid(torch.einsum("rc,bc...->br...", self.mix, x))
        return rgb.movedim(1, -1).contiguous()

    def encode(self, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
        x = pixels[..., :3].float().cpu().movedim(-1, 1)
        h, w = max(1, x.shape[-2] // self.downscale_ratio), max(1, x.shape[-1] // self.downscale_ratio)
        x = F.interpolate(x * 2 - 1, size=(h, w), mode="area")
        latent = torch.einsum("cr,brhw->bchw", torch.linalg.pinv(self.mix), x)
        return latent[:, :, None] if self.video else latent


class TinyFamilyModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTinyFamilyModel", display_name="Tiny Random Model of a Family (dev)",
            category=CATEGORY, is_experimental=True,
            description="Development only: a TINY random-weight model of one flow family (ComfyUI's own model "
                        "class and config, one block per list), for tests. Not a real model.",
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="flux",
                               tooltip="Flow-model family (ComfyUI config class in comfy.supported_models)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="Tiny random-weight MODEL of the family.")],
        )

    @classmethod
    def execute(cls, family, seed) -> io.NodeOutput:
        return io.NodeOutput(build_family_model(family, seed))


class TinyTextEncoderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTinyTextEncoder", display_name="Tiny Random Text Encoder (dev)",
            category=CATEGORY, is_experimental=True,
            description="Development only: a CLIP whose conditioning for each prompt is a seeded random "
                        "[1, tokens, width] tensor (with pooled_output / attention_mask if asked), the shape a "
                        "tiny model of a family expects. Not a real text encoder.",
            inputs=[
                io.Int.Input("width", default=32, min=1, max=16384, tooltip="Conditioning width (features)."),
                io.Int.Input("tokens", default=8, min=1, max=1024, tooltip="Conditioning length (tokens)."),
                io.Int.Input("pooled_width", default=0, min=0, max=16384,
                             tooltip="Width of pooled_output; 0 = pooled_output None."),
                io.Boolean.Input("attention_mask", default=False, tooltip="Add an all-ones attention_mask."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the prompt embeddings."),
                io.Int.Input("llama3_layers", default=0, min=0, max=64, optional=True,
                             tooltip="HiDream: add conditioning_llama3 [1, layers, tokens, width]; 0 = none."),
            ],
            outputs=[io.Clip.Output(display_name="clip", tooltip="The tiny text encoder.")],
        )

    @classmethod
    def execute(cls, width, tokens, pooled_width, attention_mask, seed, llama3_layers=0) -> io.NodeOutput:
        return io.NodeOutput(TinyTextEncoder(width, tokens, pooled_width, attention_mask, seed, llama3_layers))


class TinyVAENode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTinyVAE", display_name="Tiny Random VAE (dev)", category=CATEGORY, is_experimental=True,
            description="Development only: decodes a latent of any channel count (image or video) to RGB by a "
                        "fixed random channel mix. Not a real VAE.",
            inputs=[
                io.Int.Input("channels", default=16, min=1, max=1024, tooltip="Latent channels of the model."),
                io.Int.Input("downscale", default=8, min=1, max=64, tooltip="Pixel-to-latent scale for encode."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the channel mix."),
                io.Boolean.Input("video", default=False, optional=True,
                                 tooltip="Encode images as one-frame video latents [B, C, 1, h, w] (Wan-VAE "
                                         "families: Qwen-Image, Wan)."),
            ],
            outputs=[io.Vae.Output(display_name="vae", tooltip="The tiny VAE.")],
        )

    @classmethod
    def execute(cls, channels, downscale, seed, video=False) -> io.NodeOutput:
        return io.NodeOutput(TinyVAE(channels, downscale, seed, video))


FAMILY_NODES: list[type[io.ComfyNode]] = [TinyFamilyModelNode, TinyTextEncoderNode, TinyVAENode]
