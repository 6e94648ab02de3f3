"""Export Run Config: the graph's training settings as a TOML run config for headless / multi-GPU training.

The node writes ``output/branchgrpo/<name>.toml`` (atomically) for ``python -m branchgrpo train`` and
``torchrun --nproc_per_node N -m branchgrpo train`` and shows both commands. Model files are resolved
through ComfyUI's folders (``models/diffusers``, ``models/diffusion_models``, ``models/vae``); the
headless run loads them through diffusers and writes its LoRA into ``models/loras/branchgrpo/`` in
ComfyUI's key format. The config is validated with the same parser the command line uses, so a bad
setting fails here, naming the field.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import shlex
import sys

from comfy_api.latest import io

from branchgrpo.advantage import AdvantageConfig
from branchgrpo.config_file import (DEFAULT_LORA_TARGETS, RUN_NAME, ConfigError, dump_config, parse_config,
                                    write_text_atomic)
from branchgrpo.objectives import ObjectiveConfig
from branchgrpo.pruning import PruningConfig
from branchgrpo.rewards.registry import MODEL_REWARDS
from branchgrpo.rewards.weight_free import WEIGHT_FREE_REWARDS
from branchgrpo.schedule import BranchSchedule

from . import inputs
from . import types as T
from .method import Method
from . import comfy_core as core

NODE = "BranchGRPO Export Run Config"
FROM_FOLDER = "(from the diffusers folder)"
NONE_FOUND = "(no diffusers model in models/diffusers)"
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diffusers_folders() -> dict[str, str]:
    """``{name: path}`` of the diffusers model folders (holding model_index.json) in ComfyUI's diffusers folders,
    one or two levels deep (``models/diffusers/FLUX.1-dev`` or ``models/diffusers/black-forest-labs/FLUX.1-dev``)."""
    found: dict[str, str] = {}
    for base in core.folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            if not os.path.isdir(path):
                continue
            if os.path.isfile(os.path.join(path, "model_index.json")):
                found.setdefault(entry, path)
                continue
            for sub in sorted(os.listdir(path)):
                p2 = os.path.join(path, sub)
                if os.path.isfile(os.path.join(p2, "model_index.json")):
                    found.setdefault(f"{entry}/{sub}", p2)
    return found


def _files(kind: str) -> list[str]:
    try:
        return core.folder_paths.get_filename_list(kind)
    except Exception:  # folder kind not registered
        return []


def _reward_dirs() -> list[str]:
    try:
        return list(core.folder_paths.get_folder_paths("reward_models"))
    except Exception:
        return []


def reward_entries(reward, weight: float = 1.0) -> list[dict]:
    """A REWARD_MODEL as config entries ``{name, weight, args}`` (a Reward Mix becomes one entry per member).

    Extension point: a reward object with ``spec`` (a dict, or a method returning one) of the form
    ``{"name": <registry name>, "args": {<loader kwargs>}}`` is written as is. Otherwise weight-free
    rewards are written with their constructor arguments, and model rewards by name with their batching
    settings and ComfyUI's reward_models folders as ``search_dirs`` (the loader finds the usual file names)."""
    if hasattr(reward, "rewards") and hasattr(reward, "weights"):
        out = []
        for r, w in zip(reward.rewards, reward.weights):
            out += reward_entries(r, weight * float(w))
        return out
    spec = getattr(reward, "spec", None)
    if callable(spec):
        spec = spec()
    if isinstance(spec, dict) and spec.get("name"):
        return [{"name": spec["name"], "weight": weight, "args": dict(spec.get("args") or {})}]
    scorer = getattr(reward, "scorer", reward)  # ComfyManagedReward wraps the engine scorer
    name = getattr(scorer, "name", None)
    if name in WEIGHT_FREE_REWARDS:
        params = [p for p in inspect.signature(WEIGHT_FREE_REWARDS[name].__init__).parameters if p != "self"]
        args = {p: getattr(scorer, p) for p in params if isinstance(getattr(scorer, p, None), (int, float, str, bool))}
        return [{"name": name, "weight": weight, "args": args}]
    if name in MODEL_REWARDS:
        args = {"search_dirs": _reward_dirs(), "batch_size": int(getattr(scorer, "batch_size", 8)),
                "temporal_weight": float(getattr(scorer, "temporal_weight", 0.0))}
        if getattr(scorer, "max_frames", None):
            args["max_frames"] = int(scorer.max_frames)
        try:
            dtype = next(p.dtype for m in scorer.modules() for p in m.parameters())
            args["dtype"] = str(dtype).split(".")[-1]
        except Exception:
            pass
        return [{"name": name, "weight": weight, "args": args}]
    raise ValueError(f"{NODE}: reward — {name or type(scorer).__name__!r} cannot be written to a run config (it is "
                     "not a registered reward); use a reward loader of this pack or the weight-free reward.")


def launch_commands(config_path: str, nproc: int) -> tuple[str, str]:
    cd = f"cd {shlex.quote(PACK_DIR)} && "
    single = cd + f"{shlex.quote(sys.executable)} -m branchgrpo train {shlex.quote(config_path)}"
    multi = cd + f"torchrun --nproc_per_node {nproc} -m branchgrpo train {shlex.quote(config_path)}"
    return single, multi


class ExportRunConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        folders = list(diffusers_folders()) or [NONE_FOUND]
        return io.Schema(
            node_id="BranchGRPOExportRunConfig", display_name="Export Run Config (BranchGRPO)", category=T.CATEGORY,
            is_output_node=True, not_idempotent=True,
            description="Writes this graph's training settings (model files, prompts, reward, branch schedule, "
                        "advantage, pruning, LoRA and optimizer settings) as a TOML run config to "
                        "output/branchgrpo/<name>.toml, and shows the commands that train it headless: "
                        "'python -m branchgrpo train <config>' on one GPU, or 'torchrun --nproc_per_node N -m "
                        "branchgrpo train <config>' on several (one prompt's tree per GPU; FSDP for models that do "
                        "not fit one GPU). The headless run uses diffusers with the same engine and writes its LoRA "
                        "to models/loras/branchgrpo/<name>.safetensors in ComfyUI's key format.",
            inputs=[
                io.String.Input("name", default="branchgrpo_run", tooltip="Run name (letters, digits, _ . -): "
                                "the config file output/branchgrpo/<name>.toml, the run folder "
                                "output/branchgrpo/<name>/ and the LoRA models/loras/branchgrpo/<name>.safetensors."),
                io.Combo.Input("diffusers_model", options=folders, tooltip="The model as a local diffusers folder in "
                               "models/diffusers (FLUX.1, SD3/3.5 or Wan 2.1 with model_index.json). It provides the "
                               "configs, tokenizers and text encoders, and every weight not chosen below."),
                T.Prompts.Input("prompts", tooltip="Training prompts (from the Prompts node)."),
                T.RewardModel.Input("reward", tooltip="The reward (a reward loader, the weight-free reward or a "
                                    "Reward Mix); written by name with its settings."),
                T.Schedule.Input("schedule", optional=True, tooltip="Branch schedule (default: the paper's 20 steps, "
                                 "splits 0,3,6,9, K=2)."),
                T.Advantage.Input("advantage", optional=True, tooltip="Advantage settings (default: tree, mean)."),
                T.Pruning.Input("pruning", optional=True, tooltip="Pruning settings (default: none)."),
                Method.Input("method", optional=True, tooltip="What each rollout trains, from a Method node "
                             "(default: ppo); written as the config's [objective] section."),
                inputs.settings_input("Expert settings from a Trainer Settings node: PPO clip, KL, optimizer steps, "
                                      "batching, CFG and FLUX guidance, as the Trainer uses them (gradient "
                                      "checkpointing 'auto' = on). Unconnected: every default."),
                io.Combo.Input("transformer_file", options=[FROM_FOLDER] + _files("diffusion_models"),
                               default=FROM_FOLDER, optional=True,
                               tooltip="Optional single-file transformer from models/diffusion_models (original / "
                                       "ComfyUI layout, e.g. flux1-dev.safetensors) instead of the folder's."),
                io.Combo.Input("vae_file", options=[FROM_FOLDER] + _files("vae"), default=FROM_FOLDER, optional=True,
                               tooltip="Optional single-file VAE from models/vae (e.g. ae.safetensors) instead of the "
                                       "folder's."),
                io.Combo.Input("family", options=["auto", "flux", "sd3", "wan"], default="auto", optional=True,
                               tooltip="Model family; 'auto' reads it from the diffusers folder."),
                io.Int.Input("width", default=512, min=16, max=4096, step=16, optional=True,
                             tooltip="Training resolution: width in pixels (memory grows with width x height)."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16, optional=True,
                             tooltip="Training resolution: height in pixels."),
                io.Int.Input("frames", default=33, min=1, max=1025, step=4, optional=True,
                             tooltip="Wan only: video frames (4k+1). Ignored for image models."),
                *(o.input(optional=True) for o in inputs.TRAINER_INPUTS if o is not inputs.PROMPTS_PER_ITERATION),
                inputs.ALGORITHM.input(optional=True, tooltip="The adapter the command line trains (with peft): "
                                       "LoRA, LoHa, LoKr or OFT; every file loads with the stock LoRA loaders."),
                inputs.PROMPTS_PER_ITERATION.input(
                    optional=True, default=8, tooltip="Trees per iteration (global batch). With torchrun they are "
                    "dealt to the GPUs: use a multiple of the number of processes."),
                io.String.Input("lora_targets", default=",".join(DEFAULT_LORA_TARGETS), optional=True,
                                tooltip="Comma-separated globs of the Linear layers to adapt, by DIFFUSERS module name "
                                        "(e.g. '*.to_q,*.to_k,*.to_v,*.to_out.0'); the exported LoRA uses ComfyUI's "
                                        "names. (The Trainer Settings' lora_targets use ComfyUI's names and are not "
                                        "used here.)"),
                io.Combo.Input("dtype", options=["auto", "bfloat16", "float16", "float32"], default="auto",
                               optional=True, tooltip="Model weights/compute dtype of the headless run (auto: "
                                                      "bfloat16 on GPUs, float32 on CPU)."),
                io.Boolean.Input("fsdp", default=False, optional=True,
                                 tooltip="Shard the transformer over the GPUs (FSDP) for models that do not fit one "
                                         "GPU; needs torchrun with >= 2 processes."),
                io.Int.Input("nproc_per_node", default=8, min=1, max=1024, optional=True,
                             tooltip="GPUs per machine in the shown torchrun command."),
            ],
            outputs=[
                io.String.Output(display_name="config_path", tooltip="Path of the written .toml run config."),
                io.String.Output(display_name="command", tooltip="The single-process command that trains it."),
            ],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        if isinstance(name, str) and not RUN_NAME.match(name):
            return (f"{NODE}: name — {name!r} is not a plain file name; use letters, digits, '_', '.' or '-' "
                    "(no slashes), e.g. 'flux_hps_run1'.")
        return True

    @classmethod
    def execute(cls, name, diffusers_model, prompts, reward, schedule=None, advantage=None, pruning=None,
                transformer_file=FROM_FOLDER, vae_file=FROM_FOLDER, family="auto", width=512, height=512, frames=33,
                iterations=inputs.ITERATIONS.default, prompts_per_iteration=8,
                learning_rate=inputs.LEARNING_RATE.default, lora_rank=inputs.LORA_RANK.default,
                lora_alpha=inputs.LORA_ALPHA.default, seed=inputs.SEED.default,
                lora_targets=",".join(DEFAULT_LORA_TARGETS), settings=None, dtype="auto", fsdp=False,
                nproc_per_node=8, method=None, algorithm=inputs.ALGORITHM.default) -> io.NodeOutput:
        s = inputs.TrainerSettings.of(settings)
        if not RUN_NAME.match(name or ""):
            raise ValueError(cls.validate_inputs(name=name))
        folders = diffusers_folders()
        model_path = folders.get(diffusers_model)
        if model_path is None and diffusers_model and os.path.isdir(diffusers_model):
            model_path = diffusers_model
        if model_path is None:
            raise ValueError(f"{NODE}: diffusers_model — {diffusers_model!r} is not a diffusers model folder in "
                             f"{', '.join(core.folder_paths.get_folder_paths('diffusers'))}; put the model's diffusers "
                             "folder (with model_index.json) there.")
        if not isinstance(prompts, dict) or not prompts.get("train"):
            raise ValueError(f"{NODE}: prompts — empty; connect a Prompts node with at least one training prompt.")
        entries = reward_entries(reward)
        aggregation = getattr(reward, "aggregation", "reward_sum")
        model = {"family": family, "path": model_path, "width": int(width), "height": int(height),
                 "frames": int(frames), "guidance": float(s.flux_guidance), "cfg_scale": float(s.cfg),
                 "negative_prompt": s.negative_prompt, "gradient_checkpointing": s.gradient_checkpointing != "off",
                 "fsdp": bool(fsdp)}
        if transformer_file and transformer_file != FROM_FOLDER:
            model["transformer_file"] = core.folder_paths.get_full_path_or_raise("diffusion_models", transformer_file)
        if vae_file and vae_file != FROM_FOLDER:
            model["vae_file"] = core.folder_paths.get_full_path_or_raise("vae", vae_file)
        out_dir = os.path.join(core.folder_paths.get_output_directory(), "branchgrpo")
        loras = core.folder_paths.get_folder_paths("loras")[0]
        adv = dataclasses.asdict(advantage or AdvantageConfig())
        adv["aggregation"] = aggregation
        data = {
            "run": {"name": name, "output_dir": out_dir, "dtype": dtype,
                    "lora_file": os.path.join(loras, "branchgrpo", f"{name}.safetensors")},
            "model": model,
            "lora": {"rank": int(lora_rank), "alpha": float(lora_alpha),
                     "targets": [t.strip() for t in (lora_targets or "").split(",") if t.strip()],
                     **_algorithm_entry(algorithm)},
            "prompts": {"train": list(prompts["train"])},
            "rewards": entries,
            "training": {"iterations": int(iterations), "prompts_per_iteration": int(prompts_per_iteration),
                         "seed": int(seed), "max_batch": int(s.max_batch), "checkpoint_every": 1},
            "schedule": dataclasses.asdict(schedule or BranchSchedule()),
            "advantage": adv,
            "pruning": dataclasses.asdict(pruning or PruningConfig()),
            "objective": dataclasses.asdict(method or ObjectiveConfig()),
            "optim": {"learning_rate": float(learning_rate), "clip_range": float(s.clip_range),
                      "kl_beta": float(s.kl_beta), "max_grad_norm": float(s.max_grad_norm),
                      "edges_per_step": int(s.edges_per_step), "max_train_batch": int(s.max_train_batch)},
        }
        try:
            cfg_obj = parse_config(data, base_dir=out_dir, check_files=True)
        except ConfigError as e:
            raise ValueError(f"{NODE}: {e.field} — {str(e).split(f'{e.field}: ', 1)[-1]}") from None
        path = os.path.join(out_dir, f"{name}.toml")
        single, multi = launch_commands(path, int(nproc_per_node))
        header = (f"BranchGRPO run config exported from ComfyUI ({NODE}). Train it with:  {single}   or on "
                  f"{nproc_per_node} GPUs:  {multi}")
        write_text_atomic(path, dump_config(cfg_obj, docs=True, header=header))
        text = (f"wrote {path}\n\none process:\n  {single}\n\n{nproc_per_node} GPUs (torchrun):\n  {multi}\n\n"
                f"LoRA -> {cfg_obj.lora_path}")
        return io.NodeOutput(path, single, ui={"text": [text]})


def _algorithm_entry(algorithm: str) -> dict:
    """``{"algorithm": ...}`` for the run config's [lora] section (the command line trains it with peft)."""
    from branchgrpo.config_file import LoRASection
    if "algorithm" in {f.name for f in dataclasses.fields(LoRASection)}:
        return {"algorithm": algorithm}
    if algorithm != "LoRA":
        raise ValueError(f"{NODE}: algorithm — the command line of this version trains LoRA only; set algorithm to "
                         "LoRA to export this run.")
    return {}


__all__ = ["ExportRunConfigNode", "diffusers_folders", "reward_entries", "launch_commands"]
