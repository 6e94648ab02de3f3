"""The Trainer node: BranchGRPO fine-tuning of a LoRA inside a ComfyUI graph.

``execute`` is the user's journey in four steps, each in the file of its concern: the request checked without
compute (:class:`nodes.run_request.RunRequest`), the memory plan and budget check (:func:`nodes.memory.plan_memory`),
the training session (:func:`train_session`: attach, encode, train with progress) and the outputs
(:func:`outputs`: the LoRA with metadata describing its tensors, the MODEL with it, the metrics, the node's text).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
from comfy_api.latest import io

from branchgrpo.trainer import BranchGRPOTrainer, Callback

from . import inputs, memory
from . import types as T
from . import adapters as adapter_sets
from .comfy_model import ComfyFlowModel, attach_lora, model_family
from .comfy_model import gradient_checkpointing as checkpointing_blocks
from .method import Method
from .preview import PREVIEW_MAX_SIZE, PreviewKeeper
from .run_request import (NODE, RUN_NAME, RunRequest, checkpoint_dir, config_differences,  # noqa: F401 (API)
                          run_name_error, unpack_reward)
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")
PROGRESS_UNITS = 100  # progress-bar units per iteration: half rollout, half update


class LoraStateDict(dict):
    """ComfyUI's LORA_MODEL (a plain ``{key: tensor}`` dict) that also carries the run's metadata."""
    metadata: dict


def _send(event: str, data: dict) -> None:
    try:
        server = core.prompt_server()
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
        self.pbar = core.utils.ProgressBar(total * PROGRESS_UNITS, node_id=node_id)
        self.pbar.update_absolute(start * PROGRESS_UNITS)
        self.tree_view = None
        self.preview = PreviewKeeper(decode)

    def _keep_preview(self, update, *args) -> None:
        """A preview is worth no run: a failure to decode it is logged, only an interrupt goes through."""
        try:
            update(*args)
        except core.Interrupted:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("BranchGRPO %s: no preview this iteration (%s: %s)", self.run_name, type(e).__name__, e)

    def on_model_call(self, phase, done, total):
        core.check_interrupted()
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
        plan = memory.plan_memory(request, model, clip, vae, reward)
        for note in request.notes:
            log.warning("BranchGRPO %s: %s", request.run_name, note)
        trained = train_session(request, plan, model, clip, vae)
        return outputs(request, plan, trained, model)


@dataclasses.dataclass
class Trained:
    trainer: BranchGRPOTrainer
    lora: object  # the adapter set
    lora_sd: "LoraStateDict"
    resumed_from: int | None


def train_session(request: RunRequest, plan: memory.RunPlan, model, clip, vae) -> Trained:
    """Attach the adapter, encode the prompts, train with progress on the node; the adapter's state at the end."""
    s, policy, ckpt = request.settings, plan.policy, request.checkpoint
    with torch.inference_mode(False), torch.enable_grad():
        base = (model if policy.base_weights not in memory.FP8
                else memory.with_base_dtype(model, memory.FP8[policy.base_weights]))
        mp, lora = attach_lora(base, request.lora_cfg, seed=request.seed, device=model.load_device,
                               algorithm=request.algorithm, train_bias_norm=request.train_bias_norm,
                               existing=request.existing)
        log.info("BranchGRPO %s: training on %s, model patcher %s, %s adapter on %d layers", request.run_name,
                 model.load_device, type(mp).__name__, request.algorithm, adapter_sets.describe_set(lora)["layers"])
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
        if request.state is not None:
            try:
                trainer.load_state_dict(request.state)
            except RuntimeError as e:  # adapter tensors of another shape: other algorithm, rank or layers
                raise ValueError(resume_mismatch(request.state.get("adapter") or {}, lora, ckpt, e)) from None
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
        oom = None
        with flow.session(s.max_batch), checkpointing_blocks(mp, request.checkpointing):
            try:
                trainer.train(checkpoint_path=ckpt)
            except torch.OutOfMemoryError as e:  # CUDA's, and any device's: the session below is let go first
                oom = (trainer.phase, trainer.iteration, (str(e).strip().splitlines() or [""])[0][:300])
        if oom is not None:  # the exception (and the tensors its frames held) is gone: unload, free, then explain
            memory.release([mp, base, *memory.patchers_of(vae), *(p for r in request.rewards
                                                                   for p in memory.patchers_of(r))])
            del trainer, flow, lora, mp, base, decode
            memory.free_cache()
            raise ValueError(memory.out_of_memory_message(NODE, *oom, plan.run_memory, model.load_device, ckpt))
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


def outputs(request: RunRequest, plan: memory.RunPlan, trained: Trained, model) -> io.NodeOutput:
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
    out_model, _ = core.sd.load_lora_for_models(model, None, dict(lora_sd), 1.0, 0)
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


__all__ = ["TrainerNode", "LoraStateDict", "checkpoint_dir", "unpack_reward", "config_differences"]
