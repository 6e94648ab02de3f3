"""The Trainer node: BranchGRPO fine-tuning of a LoRA inside a ComfyUI graph."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths
from branchgrpo.advantage import AdvantageConfig
from branchgrpo.loss import OptimConfig
from branchgrpo.objectives import ObjectiveConfig, timestep_candidates
from branchgrpo.lora import LoRAConfig, select_linear
from branchgrpo.pruning import PruningConfig
from branchgrpo.rewards.base import Reward
from branchgrpo.schedule import BranchSchedule
from branchgrpo.trainer import BranchGRPOTrainer, Callback, TrainerConfig

from . import inputs, memory
from . import types as T
from . import adapters as adapter_sets
from .comfy_model import ComfyFlowModel, attach_lora, encode_prompt, model_family, require_flow_model
from .comfy_model import gradient_checkpointing as checkpointing_blocks
from .method import Method
from .preview import PREVIEW_MAX_SIZE, PreviewKeeper

log = logging.getLogger("BranchGRPO")
NODE = "BranchGRPO Trainer"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROGRESS_UNITS = 100  # progress-bar units per iteration: half rollout, half update


class LoraStateDict(dict):
    """ComfyUI's LORA_MODEL (a plain ``{key: tensor}`` dict) that also carries the run's metadata."""
    metadata: dict


def checkpoint_dir(run_name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), "branchgrpo", run_name)


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
        server = PromptServer.instance
        data = {"prompt_id": getattr(server, "last_prompt_id", None), **data}
        server.send_sync(event, data, server.client_id)
    except Exception:  # no server (tests, headless): nothing to stream to
        pass


def _jsonable(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None)
            for k, v in metrics.items()}


class ComfyProgress(Callback):
    """Progress bar per iteration (with the rollout / update progress inside), interrupt checks
    before every model call, metrics + the latest tree streamed to the browser, and a preview on the node
    (best and worst leaf of the latest tree, the latest evaluation samples; nodes/preview.py)."""

    def __init__(self, node_id, run_name: str, start: int, total: int, decode=None):
        self.node_id, self.run_name, self.total = node_id, run_name, total
        self.iteration = start
        self.pbar = comfy.utils.ProgressBar(total * PROGRESS_UNITS, node_id=node_id)
        self.pbar.update_absolute(start * PROGRESS_UNITS)
        self.tree_view = None
        self.preview = PreviewKeeper(decode)

    def _keep_preview(self, update, *args) -> None:
        """A preview is worth no run: a failure to decode it is logged, only an interrupt goes through."""
        try:
            update(*args)
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("BranchGRPO %s: no preview this iteration (%s: %s)", self.run_name, type(e).__name__, e)

    def on_model_call(self, phase, done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if phase not in ("rollout", "train"):  # the measurements after the update: the bar stays
            return
        frac = done / max(total, 1)
        frac = 0.5 * frac if phase == "rollout" else 0.5 + 0.5 * frac
        self.pbar.update_absolute(int(self.iteration * PROGRESS_UNITS + frac * PROGRESS_UNITS))

    def on_rollout_end(self, iteration, tree, leaf_rewards, images):
        first = tree.tree == 0
        widths = [int(((tree.depth == d) & first).sum()) for d in range(tree.num_steps + 1)]
        n0 = int((tree.leaf_tree() == 0).sum())
        self.tree_view = {"widths": widths, "leaf_rewards": [float(r) for r in leaf_rewards[:n0]],
                          "forks": [i for i in range(tree.num_steps) if widths[i + 1] > widths[i]]}
        self._keep_preview(self.preview.rollout, tree, leaf_rewards, images)

    def on_evaluation(self, iteration, result):
        self._keep_preview(self.preview.evaluation, iteration, result)

    def on_iteration_end(self, iteration, metrics):
        self.iteration = iteration
        image = self.preview.image()
        self.pbar.update_absolute(iteration * PROGRESS_UNITS, None,
                                  ("JPEG", image, PREVIEW_MAX_SIZE) if image is not None else None)
        _send("branchgrpo.metrics", {"node": self.node_id, "run": self.run_name, "iteration": iteration,
                                     "total": self.total, "metrics": _jsonable(metrics), "tree": self.tree_view})
        held = f" held-out {metrics['eval_reward']:.4f}" if "eval_reward" in metrics else ""
        log.info("BranchGRPO %s it %d/%d reward %.4f (best %.4f worst %.4f, spread in trees %.3g)%s KL %.3g "
                 "grad norm %.3g %.1fs", self.run_name, iteration, self.total, metrics["reward_mean"],
                 metrics["reward_max"], metrics["reward_min"], metrics.get("reward_spread", float("nan")), held,
                 metrics.get("kl_ref", metrics.get("kl", float("nan"))), metrics.get("grad_norm", float("nan")),
                 metrics["time_total"])


class TrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTrainer", display_name="Trainer (BranchGRPO)", category=T.CATEGORY,
            is_experimental=True, not_idempotent=True,
            description="Fine-tunes an adapter (LoRA, LoHa, LoKr or OFT) on the MODEL with BranchGRPO: each iteration samples a branching tree "
                        "per prompt, decodes and scores the leaves with the reward model, turns rewards into "
                        "per-edge advantages, prunes, and takes a PPO-clip step on the kept edges. The input "
                        "MODEL is untouched; the output MODEL carries the trained adapter. A checkpoint is written "
                        "after every iteration to output/branchgrpo/<run_name>/ and 'resume' continues it; "
                        "'continue_lora' starts from a LoRA file instead.",
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            inputs=[
                io.Model.Input("model", tooltip="A flow-matching diffusion model (FLUX, SD3/3.5, Wan, ...). "
                               "Its weights stay frozen; LoRAs applied upstream keep acting."),
                io.Clip.Input("clip", tooltip="Text encoder(s) used to encode every training prompt."),
                io.Vae.Input("vae", tooltip="Decodes the leaves for the reward model."),
                T.Prompts.Input("prompts", tooltip="Training prompts (from the Prompts node)."),
                T.RewardModel.Input("reward", tooltip="The reward model (a reward loader or Reward Mix)."),
                io.Latent.Input("latent", tooltip="An empty latent of the training resolution (and frames, for "
                                "video). Only its shape is used: memory grows with its size."),
                *(o.input() for o in inputs.TRAINER_INPUTS),
                T.Schedule.Input("schedule", optional=True, tooltip="Branch schedule (default: the paper's "
                                 "20 steps, splits 0,3,6,9, K=2)."),
                T.Advantage.Input("advantage", optional=True, tooltip="Advantage settings (default: tree, mean)."),
                T.Pruning.Input("pruning", optional=True, tooltip="Pruning settings (default: none)."),
                Method.Input("method", optional=True, tooltip="What each rollout trains, from a Method node "
                             "(default: ppo, BranchGRPO's update on the stochastic edges; diffusionnft, awm and "
                             "dgpo train on the leaves' clean images)."),
                inputs.settings_input(),
                inputs.RUN_NAME.input(optional=True),
                inputs.RESUME.input(optional=True),
                inputs.ALGORITHM.input(optional=True),
                inputs.CONTINUE_LORA.input(optional=True, options=inputs.lora_choices()),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input MODEL with the trained LoRA applied."),
                T.LoraModel.Output(display_name="lora", tooltip="The trained adapter in ComfyUI's key format "
                                   "(what ComfyUI's own trainer outputs); works with Save LoRA, ComfyUI's Save LoRA "
                                   "Weights and Load LoRA Model."),
                T.Metrics.Output(display_name="metrics", tooltip="Per-iteration metrics of the run."),
            ],
        )

    @classmethod
    def validate_inputs(cls, run_name=None):
        """Checked when the prompt is queued; the error is shown once, on run_name."""
        if isinstance(run_name, str) and not RUN_NAME.match(run_name):
            return run_name_error(run_name)
        return True

    @classmethod
    def execute(cls, model, clip, vae, prompts, reward, latent, iterations, prompts_per_iteration, learning_rate,
                lora_rank, lora_alpha, seed, schedule=None, advantage=None, pruning=None, settings=None,
                run_name=inputs.RUN_NAME.default, resume=inputs.RESUME.default, method=None,
                algorithm=inputs.ALGORITHM.default, continue_lora=inputs.CONTINUE_LORA.default) -> io.NodeOutput:
        hidden = cls.hidden
        request = RunRequest.check(
            model, prompts, reward, latent, node_id=hidden.unique_id if hidden is not None else None,
            prompt=hidden.prompt if hidden is not None else None, iterations=iterations,
            prompts_per_iteration=prompts_per_iteration, learning_rate=learning_rate, lora_rank=lora_rank,
            lora_alpha=lora_alpha, seed=seed, schedule=schedule, advantage=advantage, pruning=pruning,
            settings=settings, run_name=run_name, resume=resume, method=method, algorithm=algorithm,
            continue_lora=continue_lora)
        plan = plan_run(request, model, clip, vae, reward)
        for note in request.notes:
            log.warning("BranchGRPO %s: %s", request.run_name, note)
        trained = train_session(request, plan, model, clip, vae)
        return outputs(request, plan, trained, model)


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
        latent_shape = tuple(comfy.sample.fix_empty_latent_channels(model, latent["samples"]).shape[1:])
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
        return cls(node_id=node_id, run_name=run_name, resume=bool(resume), iterations=iterations, seed=seed,
                   settings=s, prompts=list(prompts["train"]),
                   eval_prompts=list(prompts.get("eval") or []) if config.eval_every else [], rewards=rewards,
                   latent_shape=latent_shape, config=config, lora_cfg=lora_cfg, algorithm=algorithm,
                   train_bias_norm=bias_norm, checkpointing=use_gc,
                   continue_lora=continue_lora if existing is not None else None, existing=existing,
                   continued_from=continued_from, notes=notes)


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
    path = folder_paths.get_full_path("loras", continue_lora)
    if path is None:
        raise ValueError(f"{NODE}: continue_lora — {continue_lora!r} is not a file in "
                         f"{', '.join(folder_paths.get_folder_paths('loras'))}; pick one of the list (refresh "
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


def plan_run(request: RunRequest, model, clip, vae, reward) -> "RunPlan":
    """The memory policy and the run's predicted peak; a run over the budget is refused before compute."""
    s = request.settings
    budget = (s.memory_budget_gb * 2 ** 30 if s.memory_budget_gb > 0
              else comfy.model_management.get_total_memory(model.load_device))
    policy = memory.plan(budget=budget, weights=model.model_size(), latent_shape=request.latent_shape,
                                max_batch=s.max_batch, vae=vae, reward=reward, base_weights=s.base_weights,
                                release_models=s.release_models)
    try:
        run_memory = memory.predict_run_memory(
            model, request.latent_shape, request.config, request.lora_cfg, checkpointing=request.checkpointing,
            num_prompts=len(request.prompts) + len(request.eval_prompts), guidance=s.flux_guidance, vae=vae,
            rewards=request.rewards, decode_batch=policy.decode_batch,
            weights_dtype=memory.FP8.get(policy.base_weights),
            conditioning=encode_prompt(clip, request.prompts[0], s.flux_guidance), algorithm=request.algorithm,
            train_bias_norm=request.train_bias_norm, existing=request.existing)
    except Exception as e:  # a model the shape-only probe cannot trace (data-dependent control flow)
        log.warning("BranchGRPO %s: the memory prediction is unavailable for this %s model (%s: %s); the run "
                    "is not checked against the budget.", request.run_name, model_family(model), type(e).__name__, e)
        run_memory = None
    if run_memory is not None and run_memory.peak > budget:
        raise ValueError(memory.budget_message(NODE, run_memory, int(budget)))
    predicted = run_memory.summary() if run_memory is not None else f"unavailable for {model_family(model)}"
    info = (f"predicted memory: {predicted}; gradient checkpointing {'on' if request.checkpointing else 'off'}; "
            f"{policy.describe()}")
    log.info("BranchGRPO %s: %s", request.run_name, info)
    state = (read_resumable_checkpoint(request.checkpoint, request.config, request.iterations)
             if request.resume and os.path.exists(request.checkpoint) else None)
    return RunPlan(policy, run_memory, info, state)


@dataclasses.dataclass
class RunPlan:
    policy: object  # nodes.memory.MemoryPlan
    run_memory: object  # the prediction (None where the probe cannot trace the model)
    info: str
    state: dict | None  # the checkpoint to resume


@dataclasses.dataclass
class Trained:
    trainer: BranchGRPOTrainer
    lora: object  # the adapter set
    lora_sd: "LoraStateDict"
    resumed_from: int | None


def train_session(request: RunRequest, plan: RunPlan, model, clip, vae) -> Trained:
    """Attach the adapter, encode the prompts, train with progress on the node; the adapter's state at the end."""
    s, policy, ckpt = request.settings, plan.policy, request.checkpoint
    with torch.inference_mode(False), torch.enable_grad():
        base = (model if policy.base_weights not in memory.FP8
                else memory.with_base_dtype(model, memory.FP8[policy.base_weights]))
        mp, lora = attach_lora(base, request.lora_cfg, seed=request.seed, device=model.load_device,
                               algorithm=request.algorithm, train_bias_norm=request.train_bias_norm,
                               existing=request.existing)
        flow = ComfyFlowModel(mp, request.latent_shape, clip=clip, negative=s.negative_prompt, cfg=s.cfg,
                              guidance=s.flux_guidance, seed=request.seed)
        flow.add_prompts(request.prompts + request.eval_prompts)  # encoded once, kept for the whole run
        if policy.release_text_encoders:
            memory.release(memory.patchers_of(clip))

        def decode(x0):
            return vae.decode(flow.to_vae_latent(x0.to(vae.device if hasattr(vae, "device") else x0.device)))

        trainer = BranchGRPOTrainer(flow, lora, request.prompts, request.rewards, decode, request.config,
                                    request.latent_shape, device=model.load_device, callbacks=[],
                                    eval_prompts=request.eval_prompts)
        trainer.iteration = request.continued_from  # seeds and prompt order go on from the file's run
        resumed_from = None
        if plan.state is not None:
            try:
                trainer.load_state_dict(plan.state)
            except RuntimeError as e:  # adapter tensors of another shape: other algorithm, rank or layers
                raise ValueError(resume_mismatch(plan.state.get("adapter") or {}, lora, ckpt, e)) from None
            resumed_from = trainer.iteration
        elif os.path.exists(ckpt):  # resume off (or a checkpoint of no use): the old one is kept aside
            aside = os.path.join(os.path.dirname(ckpt), "checkpoint.previous.pt")
            os.replace(ckpt, aside)
            request.notes.append(f"resume is off: the run's earlier checkpoint was moved to {aside} (replacing an "
                                 "older one there) and this run starts fresh")
            log.warning("BranchGRPO %s: %s", request.run_name, request.notes[-1])
        trainer.callbacks.append(ComfyProgress(request.node_id, request.run_name, trainer.iteration,
                                               request.iterations, decode=decode))
        trainer.decode_batch, trainer.reward_batch = policy.decode_batch, policy.reward_batch
        if policy.release_after_phase:
            trainer.callbacks.append(memory.ReleaseAfterPhase(vae, request.rewards))
        with flow.session(s.max_batch), checkpointing_blocks(mp, request.checkpointing):
            trainer.train(checkpoint_path=ckpt)
        for p in lora.parameters():
            p.requires_grad_(False)
        return Trained(trainer, lora, LoraStateDict(lora.comfy_state_dict()), resumed_from)


def resume_mismatch(saved_adapter: dict, lora, ckpt: str, error: Exception) -> str:
    """The resume refusal when the checkpoint's adapter is not the one this run builds: which of algorithm,
    rank, layers, bias/norm deltas differ, with both values."""
    saved, now = adapter_sets.describe_state(saved_adapter), adapter_sets.describe_set(lora)
    names = {"algorithm": "algorithm", "rank": "lora_rank", "layers": "adapted layers (lora_targets)",
             "bias_norm_deltas": "bias/norm deltas (train_bias_norm)"}
    diff = "; ".join(f"{names[k]}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in names if saved[k] != now[k])
    diff = diff or f"the same algorithm, rank and layers, but tensors of other shapes ({str(error).splitlines()[0]})"
    return (f"{NODE}: resume — the checkpoint in {os.path.dirname(ckpt)} holds another adapter: {diff}. Restore "
            "them (or continue_lora, which decides the adapter of the layers it covers), set resume off, or pick a "
            "new run_name.")


def outputs(request: RunRequest, plan: RunPlan, trained: Trained, model) -> io.NodeOutput:
    """The LoRA (metadata describing its tensors), the MODEL with it applied, the metrics and the node's text."""
    trainer, lora_sd, cfg = trained.trainer, trained.lora_sd, request.lora_cfg
    stored = trained.lora.stored()
    lora_sd.metadata = {
        "branchgrpo.method": "BranchGRPO", "branchgrpo.config": json.dumps(request.config.to_dict()),
        "branchgrpo.base_model": model_family(model), "branchgrpo.iterations": str(trainer.iteration),
        "branchgrpo.lora": json.dumps({**stored, "targets": list(cfg.targets),
                                       "train_bias_norm": request.train_bias_norm,
                                       "continued_from": request.continue_lora}),
        "branchgrpo.reward": ",".join(getattr(r, "name", type(r).__name__) for r in request.rewards),
        "branchgrpo.run_name": request.run_name, "branchgrpo.latent_shape": json.dumps(list(request.latent_shape)),
    }
    out_model, _ = comfy.sd.load_lora_for_models(model, None, dict(lora_sd), 1.0, 0)
    metrics = {"run_name": request.run_name, "history": trainer.history, "checkpoint": request.checkpoint,
               "resumed_from": trained.resumed_from or 0,
               "memory_estimate": plan.run_memory.to_dict() if plan.run_memory is not None else {}}
    last = trainer.history[-1] if trainer.history else {}
    start = (f"resumed from {trained.resumed_from}" if trained.resumed_from is not None else
             f"continued from {request.continue_lora} at {request.continued_from}" if request.existing is not None
             else "started fresh")
    text = (f"{trainer.iteration}/{request.iterations} iterations ({start}); "
            f"reward {last.get('reward_mean', float('nan')):.4f}; {plan.info}"
            + "".join(f"\nWARNING: {n}" for n in request.notes))
    return io.NodeOutput(out_model, lora_sd, metrics, ui={"text": [text]})


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


__all__ = ["TrainerNode", "LoraStateDict", "checkpoint_dir", "unpack_reward", "config_differences", "Reward"]
