"""Demo Model Loader (CPU demo): the pack's embedded tiny text-to-image flow model as native MODEL, CLIP, VAE.

``demo/tiny_t2i.safetensors`` (5.6 MB, made by ``python -m demo.make_demo_model``) is the pack's toy
DiT (``branchgrpo/models/toy_dit.py``): a class-conditional rectified-flow transformer that draws 16x16 RGB images of
8 prompts (``red circle``, ``green square``, ... see :data:`branchgrpo.models.toy_dit.CLASS_NAMES`). It is a custom
pixel-space architecture that no stock loader can build, so this node builds the ComfyUI objects itself:

* MODEL: a real ``comfy.model_patcher.ModelPatcher`` over :class:`DemoFlowModel`, a ``model_base.BaseModel``
  of type FLOW (CONST prediction, ``ModelSamplingDiscreteFlow`` with shift 3, the schedule it was trained
  with) whose ``diffusion_model`` is :class:`DemoDiT` (the ToyDiT with ComfyUI's call signature). Its
  "latent" is the image itself: 3 channels, 16x16, values in [-1, 1] (:class:`DemoLatentFormat`, identity
  scaling). Its Linear layers are ComfyUI ops, so LoRAs (stock loaders, weight wrappers) patch them as usual.
* CLIP: :class:`DemoTextEncoder`, used by the stock CLIPTextEncode: a prompt must be one of the 8 class names
  (case and extra spaces ignored; an empty prompt is the unconditional class, for a negative prompt). The
  CONDITIONING tensor is a one-hot of the class id, ``[1, 1, 9]``.
* VAE: :class:`DemoVAE`: decode is ``(x + 1) / 2`` to IMAGE ``[N, 16, 16, 3]`` (the stock VAEDecode works);
  encode the inverse (images of another size are resized to 16x16 first).
* LATENT: an empty ``[batch, 3, 16, 16]`` latent (no stock empty-latent node has 3 channels at 1x scale).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from safetensors import safe_open
from safetensors.torch import load_file


from branchgrpo.models.toy_dit import CLASS_NAMES, ToyDiT, ToyDiTConfig
from . import types as T
from .shims import TextEncoderShim, VAEShim
from . import comfy_core as core

NODE = "Demo Model Loader (CPU demo)"
DEMO_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "tiny_t2i.safetensors")
FORMAT = "branchgrpo-demo-t2i/1"


def normalise_prompt(text: str) -> str:
    return " ".join(str(text).lower().split())


# ------------------------------------------------------------------------------------------- MODEL
class DemoLatentFormat(core.latent_formats.LatentFormat):
    """The demo model's latent is the RGB image itself in [-1, 1]: 3 channels, no scaling."""
    scale_factor = 1.0
    latent_channels = 3
    latent_dimensions = 2

    def __init__(self):
        # previews: the latent already is RGB (the previewer maps [-1, 1] to [0, 1] itself)
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = None


class DemoModelConfig(core.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"shift": 3.0, "multiplier": 1000}  # sigma = shift*t / (1 + (shift-1)*t), t = timestep/1000
    latent_format = DemoLatentFormat
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float32]

    net_config: ToyDiTConfig | None = None  # set by build_demo_model

    def inpaint_model(self):
        return False

    def get_model(self, state_dict, prefix="", device=None):
        """A fresh (untrained) demo model of the same configuration, as ComfyUI's model configs give (the
        Trainer's memory prediction builds one under FakeTensorMode)."""
        return DemoFlowModel(self, _comfy_ops(DemoDiT(self.net_config)), device=device)


class DemoDiT(ToyDiT):
    """The ToyDiT with the diffusion-model signature ComfyUI calls: ``(x, timesteps, context, ...)``.

    ``timesteps`` is ``sigma * 1000`` (flow models); ``context`` is the demo CONDITIONING, a one-hot of the
    class id ``[B, L, num_classes + 1]`` (the last slot is the unconditional class; an all-zero context, e.g.
    from ConditioningZeroOut, is unconditional too). Returns the velocity ``noise - x0``.
    """

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def class_ids(self, context: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        null = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if context is None:
            return null
        ctx = context[:, 0, : self.null_class + 1].float()
        ids = torch.where(ctx.abs().sum(-1) > 1e-6, ctx.argmax(-1), torch.full_like(ctx[:, 0], self.null_class,
                                                                                       dtype=torch.long))
        if ids.shape[0] != batch:
            ids = ids.repeat((batch + ids.shape[0] - 1) // ids.shape[0])[:batch]
        return ids.to(device)

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        size = self.config.img_size
        if x.dim() != 4 or x.shape[1] != self.config.channels or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"{NODE}: the demo model draws {size}x{size} RGB images only, i.e. latents "
                             f"[N, {self.config.channels}, {size}, {size}]; got {tuple(x.shape)}. Use the loader's "
                             "'latent' output (or VAE Encode of a 16x16 image).")
        sigma = timesteps.float().reshape(-1) / 1000.0
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        return super().forward(x, sigma, self.class_ids(context, x.shape[0], x.device))


class DemoFlowModel(core.model_base.BaseModel):
    """``model_base.BaseModel`` (FLOW: CONST prediction, discrete-flow sampling, shift 3) over a :class:`DemoDiT`."""

    def __init__(self, model_config: DemoModelConfig, net: DemoDiT, device=None):
        super().__init__(model_config, model_type=core.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = net


def _comfy_ops(net: torch.nn.Module) -> torch.nn.Module:
    """Make every nn.Linear a ComfyUI op (same module, same weights): ModelPatcher then applies LoRA patches
    and weight wrappers to it like to any model ComfyUI loads."""
    for m in net.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = core.ops.disable_weight_init.Linear
    return net


def read_demo_file(path: str = DEMO_FILE) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{NODE}: the embedded demo model {path} is missing; restore it from the "
                                "repository or rebuild it with: python -m demo.make_demo_model")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{NODE}: {path} is not a demo model of format {FORMAT} (metadata format "
                         f"{meta.get('format')!r}); rebuild it with: python -m demo.make_demo_model")
    return load_file(path), meta


def build_demo_model(path: str = DEMO_FILE):
    """(ModelPatcher, class names) of the demo model, built fresh from ``path``."""
    sd, meta = read_demo_file(path)
    config = ToyDiTConfig.from_dict(json.loads(meta["model_config"]))
    names = tuple(json.loads(meta.get("class_names", "null")) or CLASS_NAMES)
    with torch.inference_mode(False):  # normal tensors: the Trainer trains a LoRA over these weights
        net = _comfy_ops(DemoDiT(config))
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        net.eval().requires_grad_(False)
        model_config = DemoModelConfig(dict(DemoModelConfig.unet_config))
        model_config.net_config = config
        base = DemoFlowModel(model_config, net, device=core.mm.unet_offload_device())
    mp = core.model_patcher.ModelPatcher(base, load_device=core.mm.get_torch_device(),
                                          offload_device=core.mm.unet_offload_device())
    return mp, names


# -------------------------------------------------------------------------------------------- CLIP
class DemoTextEncoder(TextEncoderShim):
    """What the stock CLIPTextEncode (and the BranchGRPO Trainer) need from a CLIP: ``tokenize`` and
    ``encode_from_tokens_scheduled``. A prompt is one of the model's class names (case-insensitive); the
    CONDITIONING is ``[[one_hot [1, 1, C + 1], {"pooled_output": one_hot [1, C + 1]}]]``."""

    def __init__(self, class_names):
        super().__init__()
        self.class_names = tuple(class_names)
        self.ids = {normalise_prompt(n): i for i, n in enumerate(self.class_names)}
        self.null = len(self.class_names)

    def clone(self):
        return DemoTextEncoder(self.class_names)

    def class_id(self, text: str) -> int:
        key = normalise_prompt(text)
        if key == "":
            return self.null
        if key not in self.ids:
            raise ValueError(f"{NODE}: prompt {str(text)[:80]!r} is not one the demo model knows. It draws 8 "
                             f"things; use one of: {', '.join(repr(n) for n in self.class_names)} (case-insensitive; "
                             "an empty prompt is unconditional, for a negative prompt).")
        return self.ids[key]

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"demo_class": [[(self.class_id(text), 1.0)]]}

    def _one_hot(self, tokens: dict) -> torch.Tensor:
        ids = [tok[0] if isinstance(tok, (tuple, list)) else int(tok)
               for batch in tokens["demo_class"] for tok in batch]
        out = torch.zeros(len(ids), self.null + 1)
        out[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        return out

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        one_hot = self._one_hot(tokens)
        cond, pooled = one_hot[:, None, :], one_hot
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


# --------------------------------------------------------------------------------------------- VAE
class DemoVAE(VAEShim):
    """Pixel space: ``decode`` maps a latent ``[N, 3, 16, 16]`` in [-1, 1] to IMAGE ``[N, 16, 16, 3]`` in [0, 1];
    ``encode`` the inverse (an IMAGE of another size is area-resized to 16x16 first)."""

    def __init__(self, size: int = 16):
        super().__init__(latent_channels=3, downscale=1)
        self.size = size

    def decode(self, samples: torch.Tensor, **kwargs) -> torch.Tensor:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"{NODE}: VAE decode — expected a demo latent [N, 3, H, W], got {tuple(samples.shape)}; "
                             "this VAE only decodes the demo model's latents.")
        return ((samples.detach().float().cpu() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
        x = pixels[..., :3].float().cpu().permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return (x * 2.0 - 1.0).contiguous()


# -------------------------------------------------------------------------------------------- node
class DemoModelLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = ", ".join(CLASS_NAMES)
        return io.Schema(
            node_id="BranchGRPODemoModelLoader", display_name=NODE, category=T.CATEGORY,
            description="The pack's embedded CPU demo model (demo/tiny_t2i.safetensors, 5.6 MB, no download): a "
                        "tiny text-to-image flow transformer that draws 16x16 pictures of 8 prompts: " + names +
                        ". Returns a native MODEL (flow, shift 3), CLIP (for the stock CLIP Text Encode: the prompt "
                        "must be one of the 8), VAE (pixel space, for the stock VAE Decode) and an empty 16x16 "
                        "LATENT. Made for trying BranchGRPO on a CPU in minutes; not a real image model.",
            inputs=[
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images in the empty LATENT output (the Trainer only uses its shape)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The demo flow model (16x16 RGB, 8 prompts)."),
                io.Clip.Output(display_name="clip", tooltip="Its text encoder: prompts must be one of: " + names +
                               " (case-insensitive; empty = unconditional)."),
                io.Vae.Output(display_name="vae", tooltip="Its pixel-space VAE (latent = the image in [-1, 1])."),
                io.Latent.Output(display_name="latent", tooltip="An empty latent [batch, 3, 16, 16] (the model only "
                                 "draws 16x16)."),
            ],
        )

    @classmethod
    def execute(cls, batch_size) -> io.NodeOutput:
        mp, names = build_demo_model()
        size = mp.model.diffusion_model.config.img_size
        latent = {"samples": torch.zeros([batch_size, 3, size, size])}
        return io.NodeOutput(mp, DemoTextEncoder(names), DemoVAE(size), latent)


__all__ = ["DemoModelLoaderNode", "DemoDiT", "DemoFlowModel", "DemoTextEncoder", "DemoVAE", "DemoLatentFormat",
           "build_demo_model", "DEMO_FILE"]
