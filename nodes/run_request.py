"""The Trainer's first step: everything its inputs ask for, checked before any compute (:class:`RunRequest`).

Settings, prompts, reward, latent, adapter plan, the LoRA file to continue, the run's checkpoint to resume and the
Save LoRA file names downstream: each bad value is refused naming the node, the field and the fix; a value that
is legal but likely not meant becomes a note for the node's text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from branchgrpo.advantage import AdvantageConfig
from branchgrpo.loss import OptimConfig
from branchgrpo.lora import LoRAConfig, select_linear
from branchgrpo.objectives import ObjectiveConfig, timestep_candidates
from branchgrpo.pruning import PruningConfig
from branchgrpo.schedule import BranchSchedule
from branchgrpo.trainer import TrainerConfig

from . import adapters as adapter_sets
from . import inputs
from .comfy_model import model_family, require_flow_model
from . import comfy_core as core

NODE = "BranchGRPO Trainer"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def checkpoint_dir(run_name: str) -> str:
    return os.path.join(core.folder_paths.get_output_directory(), "branchgrpo", run_name)


@dataclasses.dataclass
class RunRequest:
    """Everything the Trainer's inputs ask for, checked without compute (:meth:`check`)."""
    node_id: object
    run_name: str
    resume: bool
    iterations: int
    seed: int
    settings: inputs.TrainerSettings
    prompts: list
    eval_prompts: list
    rewards: list
    latent_shape: tuple
    config: TrainerConfig
    lora_cfg: LoRAConfig
    algorithm: str
    train_bias_norm: bool
    checkpointing: bool
    continue_lora: str | None = None
    existing: object = None  # the continued file (nodes.adapters.LoadedFile)
    continued_from: int = 0
    state: dict | None = None  # the run's checkpoint to resume, checked against these settings
    notes: list = dataclasses.field(default_factory=list)  # warnings for the log and the node's text

    @property
    def checkpoint(self) -> str:
        return os.path.join(checkpoint_dir(self.run_name), "checkpoint.pt")

    @classmethod
    def check(cls, model, prompts, reward, latent, *, node_id, prompt, iterations, prompts_per_iteration,
              learning_rate, lora_rank, lora_alpha, seed, schedule, advantage, pruning, settings, run_name, resume,
              method, algorithm, continue_lora) -> "RunRequest":
        s = inputs.TrainerSettings.of(settings)
        notes = check_lora_savers(prompt, node_id)
        require_flow_model(model, NODE)
        if not isinstance(prompts, dict) or not prompts.get("train"):
            raise ValueError(f"{NODE}: prompts — the prompt list is empty; connect a Prompts node with at least "
                             "one training prompt.")
        rewards, weights, aggregation = unpack_reward(reward)
        if not RUN_NAME.match(run_name or ""):
            raise ValueError(run_name_error(run_name))
        # An empty latent is shaped for the model as the KSampler does it (channels of an all-zero latent,
        # a frame axis for video-shaped models such as Qwen-Image).
        latent_shape = tuple(core.sample.fix_empty_latent_channels(model, latent["samples"]).shape[1:])
        channels = model.model.latent_format.latent_channels
        if latent_shape[0] != channels:
            raise ValueError(f"{NODE}: latent — it has {latent_shape[0]} channels but this {model_family(model)} "
                             f"model needs {channels}; use the empty-latent node that matches the model.")
        config = TrainerConfig(
            schedule=schedule or BranchSchedule(), advantage=advantage or AdvantageConfig(),
            pruning=pruning or PruningConfig(), objective=method or ObjectiveConfig(),
            optim=OptimConfig(learning_rate=learning_rate, clip_range=s.clip_range, kl_beta=s.kl_beta,
                              edges_per_step=s.edges_per_step, max_grad_norm=s.max_grad_norm,
                              max_train_batch=s.max_train_batch),
            iterations=iterations, prompts_per_iteration=prompts_per_iteration, seed=seed, max_batch=s.max_batch,
            reward_weights=tuple(weights), checkpoint_every=1,
            eval_every=int(s.eval_every) if prompts.get("eval") else 0)
        config.advantage.aggregation = aggregation
        try:
            config.validate(NODE)
        except ValueError as e:
            raise ValueError(str(e)) from None
        notes += schedule_notes(config, len(prompts["train"]))
        targets = tuple(t.strip() for t in s.lora_targets.split(",") if t.strip()) or ("*",)
        lora_cfg = LoRAConfig(rank=lora_rank, alpha=lora_alpha, targets=targets)
        try:
            lora_cfg.validate()
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from None
        bias_norm = bool(s.train_bias_norm)
        count_lora_params(model, lora_cfg)  # refuses targets that match no layer
        planned = adapter_sets.plan_targets(model.model.diffusion_model, lora_cfg)
        adapter_sets.check_rank(planned, algorithm, lora_rank, NODE)
        existing, continued_from = None, 0
        if continue_lora and continue_lora != "none":
            existing, continued_from = read_continue_lora(model, continue_lora, iterations)
            notes += overridden_inputs(existing, continue_lora, algorithm, lora_rank, lora_alpha)
        else:
            notes += adapter_sets.rank_warnings(planned, algorithm, lora_rank)
        use_gc = s.gradient_checkpointing == "on" or (s.gradient_checkpointing == "auto"
                                                      and model.model_size() > 2 ** 30)
        ckpt = os.path.join(checkpoint_dir(run_name), "checkpoint.pt")
        state = read_resumable_checkpoint(ckpt, config, iterations) if resume and os.path.exists(ckpt) else None
        return cls(node_id=node_id, run_name=run_name, resume=bool(resume), iterations=iterations, seed=seed,
                   settings=s, prompts=list(prompts["train"]),
                   eval_prompts=list(prompts.get("eval") or []) if config.eval_every else [], rewards=rewards,
                   latent_shape=latent_shape, config=config, lora_cfg=lora_cfg, algorithm=algorithm,
                   train_bias_norm=bias_norm, checkpointing=use_gc,
                   continue_lora=continue_lora if existing is not None else None, existing=existing,
                   continued_from=continued_from, state=state, notes=notes)


def schedule_notes(config: TrainerConfig, num_prompts: int) -> list[str]:
    """Refuse what the schedule and method cannot mean together; notes for what is legal but likely not meant."""
    notes = []
    obj, sch = config.objective, config.schedule
    if obj.forward_process:
        avail = timestep_candidates(sch, obj)
        asked = (getattr(obj, "requested", None) or {}).get("train_timesteps")
        if asked and asked > len(avail):
            raise ValueError(f"Method (BranchGRPO): train_timesteps — {asked}, but {obj.name} draws its timesteps "
                             f"from steps {avail.start}..{avail.stop - 1} of the {sch.num_steps}-step schedule, "
                             f"{len(avail)} in all; set at most {len(avail)}, or 0 for the method's default.")
        if obj.train_timesteps > len(avail):
            notes.append(f"Method: {obj.name} trains {len(avail)} timesteps per image, not its default "
                         f"{obj.train_timesteps}: the {sch.num_steps}-step schedule offers no more")
        if sch.sde_window is None:
            notes.append(f"Method: {obj.name} samples with SDE at every step here, while its paper samples ODE "
                         "(flat) or ODE except the forks (tree); set the Branch Schedule's sde_mode to 'none' or "
                         "'forks only' to train as the presets do")
    if config.prompts_per_iteration > num_prompts:
        per = config.prompts_per_iteration / num_prompts
        notes.append(f"prompts_per_iteration — {config.prompts_per_iteration} trees per iteration from "
                     f"{num_prompts} prompt(s): each prompt is sampled about {per:.3g} times per iteration (time "
                     "grows with it); set it to at most the number of prompts unless that is meant")
    return notes


def read_continue_lora(model, continue_lora: str, iterations: int):
    """The file to continue, turned into training modules, and the iterations it was trained for."""
    path = core.folder_paths.get_full_path("loras", continue_lora)
    if path is None:
        raise ValueError(f"{NODE}: continue_lora — {continue_lora!r} is not a file in "
                         f"{', '.join(core.folder_paths.get_folder_paths('loras'))}; pick one of the list (refresh "
                         "the page after adding files) or 'none'.")
    existing = adapter_sets.load_lora_for_training(model, path, NODE)
    done = _file_iterations(existing.metadata)
    if done >= iterations:
        raise ValueError(f"{NODE}: iterations — {continue_lora} was trained for {done} iterations and a continued run "
                         f"counts on from there ('iterations' is the total); set iterations above {done}.")
    return existing, done


def overridden_inputs(existing, continue_lora: str, algorithm: str, rank: int, alpha: float) -> list[str]:
    """Which of the Trainer's adapter inputs the continued file overrides on its layers."""
    stored = existing.stored()
    asked = {"algorithm": algorithm, "rank": rank, "alpha": float(alpha)}
    names = {"algorithm": "algorithm", "rank": "lora_rank", "alpha": "lora_alpha"}
    diff = [f"{names[k]} {asked[k]!r} (the file's: {stored[k]!r})" for k in asked
            if stored.get(k) is not None and stored[k] != asked[k]]
    if not diff:
        return []
    return [f"continue_lora — {continue_lora} keeps its own adapters, so these inputs are not used on its layers: "
            f"{'; '.join(diff)}; layers the file does not cover get fresh {algorithm} rank {rank}"]


def _file_iterations(metadata: dict) -> int:
    """The iterations a LoRA file was trained for, from its ``branchgrpo.iterations`` metadata (0 if absent)."""
    try:
        return max(0, int(str((metadata or {}).get("branchgrpo.iterations", "0")).strip()))
    except ValueError:
        return 0


def run_name_error(run_name) -> str:
    return (f"{NODE}: run_name — {run_name!r} is not a plain folder name; use letters, digits, '_', '.' or '-' "
            "(no slashes), e.g. 'flux_hps_run1'.")


SAVE_LORA = "BranchGRPOSaveLoRA"


def check_lora_savers(prompt, node_id) -> list[str]:
    """Refuse to train when a Save LoRA fed by this Trainer has a file name it would refuse after the run.

    ComfyUI still runs the outputs that validated (the Metrics Plot, images), and they pull the Trainer;
    without this check a run of hours would end with no LoRA saved. A name that comes through a link is
    followed to its value where that is known before execution (:mod:`nodes.graph_values`); the names that
    cannot be known are returned as notes for the Trainer's log and text."""
    if not isinstance(prompt, dict) or node_id is None:
        return []
    from .graph_values import UNKNOWN, known_value, source_name
    from .lora_io import resolve_lora_path
    notes = []
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != SAVE_LORA:
            continue
        ins = node.get("inputs") or {}
        source, filename = ins.get("lora"), ins.get("filename")
        if not (isinstance(source, list) and len(source) == 2 and str(source[0]) == str(node_id)):
            continue
        value = known_value(prompt, filename)
        if value is UNKNOWN:
            notes.append(f"Save LoRA (node {nid}) gets its file name from {source_name(prompt, filename)}, which "
                         "is known only when it runs: the name is checked after training")
            continue
        if isinstance(value, str):
            try:
                resolve_lora_path(value)
            except ValueError as e:
                via = "" if value is filename else f" (from {source_name(prompt, filename)})"
                raise ValueError(f"{NODE}: not started, because Save LoRA (node {nid}) would refuse its file name"
                                 f"{via} after training: {e} Fix the name and queue again.") from None
    return notes


SECTION_NODES = {"schedule": "Branch Schedule", "advantage": "Tree Advantage", "pruning": "Pruning",
                 "optim": "Trainer / Trainer Settings", "objective": "Method"}


def config_differences(saved: dict, current: dict, ignore=(), prefix: str = "") -> list[tuple[str, object, object]]:
    """``[(dotted.name, saved value, current value)]`` of every setting that differs (nested dicts walked)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if name in ignore:
            continue
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, name + ".")
        elif a != b:
            out.append((name, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return out


def read_resumable_checkpoint(ckpt: str, config: TrainerConfig, iterations: int) -> dict:
    """The checkpoint's state if this run can continue it; otherwise an error naming every difference."""
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; the optimizer state must stay trainable
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    where = os.path.dirname(ckpt)
    try:
        saved = json.loads(state["config"])
        done = int(state["iteration"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{NODE}: resume — {ckpt} is not a BranchGRPO checkpoint; set resume off or pick a new "
                         "run_name.") from None
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as in the file
    ignore = {"iterations", *getattr(TrainerConfig, "MONITORING_FIELDS", ())}
    diffs = config_differences(saved, current, ignore)
    if diffs:
        lines = "; ".join(f"{name} ({SECTION_NODES.get(name.split('.')[0], 'Trainer')}): checkpoint {a!r}, "
                          f"now {b!r}" for name, a, b in diffs)
        raise ValueError(f"{NODE}: resume — the checkpoint in {where} was made with different settings: {lines}. "
                         "Restore them, set resume off to start over, or pick a new run_name.")
    if done > iterations:
        raise ValueError(f"{NODE}: iterations — the checkpoint in {where} has already completed {done} iterations, "
                         f"more than iterations = {iterations}. Set iterations to {done} to get its LoRA without "
                         f"training, or higher to continue; set resume off or pick a new run_name to start over.")
    return state


def unpack_reward(reward) -> tuple[list, list[float], str]:
    """A REWARD_MODEL is one scorer, or a mix exposing ``rewards``, ``weights`` and ``aggregation``."""
    if hasattr(reward, "rewards") and hasattr(reward, "weights"):
        return list(reward.rewards), list(reward.weights), getattr(reward, "aggregation", "reward_sum")
    if not callable(reward):
        raise ValueError(f"{NODE}: reward — expected a REWARD_MODEL from a reward loader node, got "
                         f"{type(reward).__name__}.")
    return [reward], [1.0], "reward_sum"


def count_lora_params(model_patcher, lora_cfg: LoRAConfig) -> int:
    layers = select_linear(model_patcher.model.diffusion_model, lora_cfg)
    if not layers:
        raise ValueError(f"{NODE}: lora_targets — {','.join(lora_cfg.targets)!r} matches no Linear layer of the "
                         "model; use '*' or a pattern such as '*attn*'.")
    return sum(lora_cfg.rank * (m.in_features + m.out_features) for _, m in layers)
