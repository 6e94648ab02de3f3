"""Every input the Trainer, Trainer Settings and Export Run Config nodes share, defined once.

An ``Option`` is one input: its widget type, name, default, limits and tooltip. ``TRAINER_INPUTS`` are the
widgets a user changes every run (they stay on the Trainer); ``EXPERT_OPTIONS`` are the settings behind
the Trainer's optional ``settings`` socket, made by the Trainer Settings node. Adding an expert option is
one entry in ``EXPERT_OPTIONS``: the settings node shows it, ``TrainerSettings.defaults()`` (what the Trainer
uses when nothing is connected) carries its default, and the Trainer reads it as ``settings.<name>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from . import types as T
from . import comfy_core as core


@dataclass(frozen=True)
class Option:
    kind: type  # io.Int, io.Float, io.String, io.Boolean or io.Combo
    name: str
    default: Any
    tooltip: str
    extra: dict = field(default_factory=dict)  # min / max / step / round / options / multiline ...

    def input(self, optional: bool = False, **override):
        """The ComfyUI input; ``override`` replaces the default, limits or tooltip for one node."""
        kw = {"default": self.default, "tooltip": self.tooltip, **self.extra, **override}
        return self.kind.Input(self.name, optional=optional, **kw)


def _opt(kind, name, default, tooltip, **extra) -> Option:
    return Option(kind, name, default, tooltip, extra)


# ------------------------------------------------------------------ everyday: on the Trainer itself
ITERATIONS = _opt(io.Int, "iterations", 100, "Training iterations (one tree per prompt per iteration, then one "
                  "update).", min=1, max=1000000)
PROMPTS_PER_ITERATION = _opt(io.Int, "prompts_per_iteration", 1, "Trees per iteration. Time and the stored tree "
                             "grow linearly.", min=1, max=4096)
LEARNING_RATE = _opt(io.Float, "learning_rate", 1e-4, "AdamW learning rate of the LoRA (1e-4 to 3e-4 is usual for "
                     "LoRA).", min=1e-7, max=1e-1, step=1e-6, round=1e-8)
ALGORITHM = _opt(io.Combo, "algorithm", "LoRA", "The adapter trained, as ComfyUI's own trainer offers them: LoRA "
                 "(low rank), LoHa (Hadamard product of two low-rank pairs), LoKr (Kronecker product), OFT (orthogonal "
                 "rotation of each layer's output). Every file loads with the stock LoRA loaders. A continued file "
                 "keeps its own algorithm.", options=["LoRA", "LoHa", "LoKr", "OFT"])
LORA_RANK = _opt(io.Int, "lora_rank", 16, "Adapter rank: LoRA / LoHa rank; for LoKr the Kronecker factor and for "
                 "OFT the block size (pick one dividing the layer widths). Memory of the adapter and its optimizer "
                 "state grows with it.", min=1, max=512)
LORA_ALPHA = _opt(io.Float, "lora_alpha", 16.0, "LoRA / LoHa alpha: the update is scaled by alpha / rank. OFT: the "
                  "largest norm of the rotation's generator. LoKr (full factors): unused.",
                  min=0.01, max=1024.0, step=0.01)
SEED = _opt(io.Int, "seed", 0, "Seed of every random draw of the run (rollout noise, prompt order, LoRA "
            "initialisation).", min=0, max=2 ** 31 - 1, control_after_generate=False)
RUN_NAME = _opt(io.String, "run_name", "branchgrpo_run", "Folder of the checkpoint: output/branchgrpo/<run_name>/ "
                "(letters, digits, _ . -).")
RESUME = _opt(io.Boolean, "resume", True, "Continue from the run's checkpoint if one exists (same settings); "
              "otherwise start fresh.")
CONTINUE_LORA = _opt(io.Combo, "continue_lora", "none", "Start from a LoRA file of models/loras (any algorithm, "
                     "ComfyUI, kohya or diffusers names): its adapters are trained further, layers it does not cover "
                     "get fresh ones of 'algorithm'. The optimizer starts fresh; the iteration count (and so the seeds "
                     "and prompt order) goes on from the file's, and 'iterations' is the total. A run's checkpoint "
                     "('resume') takes precedence and is exact.", options=["none"])


def lora_choices() -> list[str]:
    """The continue_lora options: "none", then the files of models/loras."""
    return ["none", *core.folder_paths.get_filename_list("loras")]

TRAINER_INPUTS: tuple[Option, ...] = (ITERATIONS, PROMPTS_PER_ITERATION, LEARNING_RATE, LORA_RANK, LORA_ALPHA, SEED)

# ------------------------------------------------------------------ expert: the Trainer Settings node
EXPERT_OPTIONS: tuple[Option, ...] = (
    _opt(io.String, "lora_targets", "*", "Comma-separated globs of the Linear layers to adapt, by module name in "
         "ComfyUI's diffusion model (e.g. '*attn*' or '*' for all)."),
    _opt(io.Boolean, "train_bias_norm", False, "Also train bias and norm deltas, as ComfyUI's trainer does: a "
         "'.diff_b' for the bias of every adapted layer, a '.diff' for the scale of every norm layer (LayerNorm, "
         "RMSNorm, GroupNorm of ComfyUI's ops) that lora_targets selects. The stock loaders apply both."),
    _opt(io.Float, "clip_range", 1e-3, "PPO ratio clip (BranchGRPO 1e-3, DanceGRPO 1e-4).",
         min=1e-6, max=0.5, step=1e-5, round=1e-6),
    _opt(io.Float, "kl_beta", 0.0, "Weight of the KL to the base model. > 0 costs one extra forward per trained "
         "parent.", min=0.0, max=10.0, step=0.001),
    _opt(io.Int, "edges_per_step", 0, "0: one optimizer step per iteration. N: a step every N edges (official: 12).",
         min=0, max=100000),
    _opt(io.Float, "max_grad_norm", 1.0, "Gradient-norm clip.", min=1e-4, max=1000.0, step=0.01),
    _opt(io.Int, "max_batch", 16, "Most latents per model call in the rollout and decoding. Lower it if you run "
         "out of memory.", min=1, max=1024),
    _opt(io.Int, "max_train_batch", 4, "Most parent latents per forward with gradients. Activation memory grows "
         "linearly.", min=1, max=1024),
    _opt(io.Combo, "gradient_checkpointing", "auto", "Recompute activations in the backward pass: far less memory, "
         "~30% more time. 'auto' = on for models over 1 GiB.", options=["auto", "on", "off"]),
    _opt(io.Float, "memory_budget_gb", 0.0, "Refuse to start if the estimated memory of the run exceeds this many "
         "GiB (0 = the total memory of the device).", min=0.0, max=4096.0, step=0.5),
    _opt(io.Combo, "base_weights", "auto", "How the frozen base weights are stored during training. 'as loaded': "
         "as the MODEL came (a UNETLoader fp8 weight_dtype stays fp8). fp8_e4m3fn / fp8_e5m2: the Linear weights "
         "stored in fp8 (half of bf16), each layer computed in the model's dtype with the LoRA update in that "
         "dtype too. 'auto' = fp8_e4m3fn when the weights take more than half of the memory budget (FLUX.1-dev or "
         "Wan 14B on a 24 GiB card), else as loaded. The input MODEL is not changed.",
         options=["auto", "as loaded", "fp8_e4m3fn", "fp8_e5m2"]),
    _opt(io.Combo, "release_models", "auto", "Release the text encoders once the prompts are encoded, the VAE when "
         "the leaves are decoded and each reward model when it has scored them, so that one card holds only the "
         "model of the current phase. 'auto' = on when the diffusion model takes more than a quarter of the "
         "memory budget. Leaves are decoded and scored in chunks sized to the budget (at most max_batch).",
         options=["auto", "on", "off"]),
    _opt(io.Float, "cfg", 1.0, "True CFG scale (1 = off; each model call then costs two evaluations). SD3/3.5 and "
         "Wan need it (4.5-5); FLUX-dev is guidance-distilled (keep 1, use flux_guidance).",
         min=1.0, max=30.0, step=0.1),
    _opt(io.String, "negative_prompt", "", "Negative prompt for true CFG (only used when cfg > 1).", multiline=True),
    _opt(io.Float, "flux_guidance", 3.5, "FLUX only: the distilled guidance value fed to FLUX.1-dev's guidance input "
         "(3.5 in the research code). Every other model ignores it.", min=0.0, max=100.0, step=0.1),
    _opt(io.Int, "eval_every", 10, "Held-out evaluation (ODE samples of the Prompts node's held-out prompts, fixed "
         "seeds) every N iterations; 0 = never. Unused when no prompt is held out.", min=0, max=1000000),
    _opt(io.Float, "memory_margin", 0.10, "The caching allocator's reserve over the predicted peak (block "
         "rounding, fragmentation), as a fraction: the budget check adds it, and on CUDA also 1 GiB for the "
         "context and the libraries' workspaces.", min=0.0, max=2.0, step=0.01),
)
EXPERT = {o.name: o for o in EXPERT_OPTIONS}


class TrainerSettings(dict):
    """TRAINER_SETTINGS: ``{name: value}`` of every expert option, readable as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def defaults(cls) -> "TrainerSettings":
        return cls({o.name: o.default for o in EXPERT_OPTIONS})

    @classmethod
    def of(cls, value) -> "TrainerSettings":
        """The connected settings, any option they lack at its default (``None``: all defaults)."""
        out = cls.defaults()
        if value:
            out.update(value)
        return out


SettingsSocket = T.TrainerSettings


def settings_input(tooltip: str = "Expert settings from a Trainer Settings node (LoRA layers, PPO clip, KL, "
                   "batching, memory, CFG, FLUX guidance). Unconnected: every default."):
    return SettingsSocket.Input("settings", optional=True, tooltip=tooltip)


__all__ = ["Option", "TRAINER_INPUTS", "EXPERT_OPTIONS", "EXPERT", "TrainerSettings", "settings_input",
           "ITERATIONS", "PROMPTS_PER_ITERATION", "LEARNING_RATE", "ALGORITHM", "LORA_RANK", "LORA_ALPHA", "SEED",
           "RUN_NAME", "RESUME", "CONTINUE_LORA", "lora_choices"]
