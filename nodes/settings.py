"""Settings blocks: branch schedule, tree advantage, pruning, prompts. Each builds an engine config
object and validates it, so a bad value is reported on the node that holds it, before any compute."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from branchgrpo.advantage import AdvantageConfig
from branchgrpo.diagnostics import auto_split_noise_scale, residual_noise_warning
from branchgrpo.pruning import PruningConfig
from branchgrpo.schedule import BranchSchedule, parse_steps

from . import types as T
from .inputs import EXPERT_OPTIONS, TrainerSettings
from . import comfy_core as core

log = logging.getLogger("BranchGRPO")


def _node_error(node: str, exc: Exception) -> ValueError:
    return ValueError(f"{node}: {exc}")


SDE_MODES = {
    "auto": "the window when sde_window_size > 0, else every step (graphs made before sde_mode)",
    "everywhere": "every step is an SDE step (BranchGRPO, DanceGRPO, Flow-GRPO)",
    "window": "only [sde_window_start, +sde_window_size) and the forks (BranchGRPO-Mix, MixGRPO)",
    "forks only": "ODE except the split steps (the tree presets of DiffusionNFT / AWM / DGPO)",
    "none": "ODE everywhere, no split steps (the flat DiffusionNFT / AWM / DGPO presets; ppo cannot train it)",
}


def sde_window_of(mode: str, size: int, start: int, has_splits: bool):
    """``BranchSchedule.sde_window`` of a Branch Schedule's ``sde_mode`` and window inputs."""
    if mode == "auto":
        mode = "window" if size > 0 else "everywhere"
    if mode == "everywhere":
        return None
    if mode == "window":
        if size < 1:
            raise ValueError("sde_window_size — sde_mode 'window' needs a window of at least 1 step; set "
                             "sde_window_size, or pick sde_mode 'forks only' / 'none' for ODE steps.")
        return (start, size)
    if mode == "forks only":
        return (0, 0)
    if mode == "none":
        if has_splits:
            raise ValueError("sde_mode — 'none' samples every step with the ODE, but the split steps need SDE noise "
                             "for their children to differ; pick 'forks only', or clear split_steps.")
        return (0, 0)
    raise ValueError(f"sde_mode — {mode!r} is not one of {', '.join(SDE_MODES)}.")


class BranchScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOBranchSchedule", display_name="Branch Schedule (BranchGRPO)", category=T.CATEGORY,
            description="The rollout tree: denoising steps, the steps at which every live sample forks into K "
                        "children, the fork noise, and the SDE. Defaults are the paper's: 20 steps, splits "
                        "0,3,6,9, K=2 -> 16 leaves, 203 model evaluations and 218 trainable edges per prompt.",
            inputs=[
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Denoising steps of a rollout (1-200). "
                             "Model evaluations per prompt grow with steps x tree width."),
                io.String.Input("split_steps", default="0,3,6,9", tooltip="Comma-separated step indices "
                                "(0 .. steps-1) at which every live node forks. Leaves = product of the branching "
                                "factors; memory and time grow with the number of leaves."),
                io.String.Input("branching", default="2", tooltip="Children per fork (K >= 1): one number for "
                                "every split, or one per split step, e.g. '2,2,4,2'."),
                io.Float.Input("split_noise_scale", default=0.0, min=0.0, max=20.0, step=0.01,
                               tooltip="Multiplier of the SDE noise at a fork. 0 = auto, per SDE: 4.0 for "
                                       "'dancegrpo' (the paper's, with eta 0.3), 1.0 for 'flowgrpo' (its std is "
                                       "far larger; 4.0 gives pure-noise leaves). Larger = more diverse siblings; "
                                       "the node warns when the leaves would keep fork noise."),
                io.Combo.Input("sde", options=["dancegrpo", "flowgrpo"], default="dancegrpo",
                               tooltip="SDE of a stochastic step: 'dancegrpo' (constant eta, BranchGRPO/DanceGRPO) "
                                       "or 'flowgrpo' (a*sqrt(sigma/(1-sigma)), Flow-GRPO/MixGRPO)."),
                io.Float.Input("eta", default=0.3, min=0.001, max=2.0, step=0.001,
                               tooltip="Noise level: eta for 'dancegrpo' (0.3 for FLUX), a for 'flowgrpo' (0.7)."),
                io.Float.Input("shift", default=3.0, min=0.1, max=20.0, step=0.05,
                               tooltip="SD3 timestep shift of the sigma schedule (3.0 in the research code)."),
                io.Int.Input("group_size", default=1, min=1, max=64, tooltip="Independent roots per prompt "
                             "(1 for a tree; 12-24 with no splits gives the flat DanceGRPO/Flow-GRPO group)."),
                io.Int.Input("sde_window_size", default=0, min=0, max=200, tooltip="Mix mode: if > 0, only steps "
                             "[window_start, window_start+size) and the split steps are stochastic; the rest are "
                             "deterministic ODE steps and are never trained (much cheaper update). 0 = all SDE "
                             "(with sde_mode auto; sde_mode says it explicitly)."),
                io.Int.Input("sde_window_start", default=0, min=0, max=199, tooltip="First step of the SDE window."),
                io.Combo.Input("sde_mode", options=list(SDE_MODES), default="auto", optional=True,
                               tooltip=" | ".join(f"{k}: {v}" for k, v in SDE_MODES.items())),
            ],
            outputs=[T.Schedule.Output(display_name="schedule", tooltip="The branching schedule.")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs):
        """Checked when the prompt is queued (widget values only; linked inputs are checked at run time).

        A bad combination is raised, not returned: ComfyUI 0.3.75 attaches a returned message to every input
        the check receives (the same error ten times), while an exception is reported once for the node.
        The message names the field."""
        needed = ("steps", "split_steps", "branching", "split_noise_scale", "sde", "eta", "shift", "group_size",
                  "sde_window_size", "sde_window_start")
        if all(kwargs.get(k) is not None for k in needed):
            cls.build(**{k: kwargs[k] for k in needed}, sde_mode=kwargs.get("sde_mode") or "auto")
        return True

    @classmethod
    def execute(cls, steps, split_steps, branching, split_noise_scale, sde, eta, shift, group_size,
                sde_window_size, sde_window_start, sde_mode="auto") -> io.NodeOutput:
        sch = cls.build(steps, split_steps, branching, split_noise_scale, sde, eta, shift, group_size,
                        sde_window_size, sde_window_start, sde_mode)
        sde_steps = sch.sde_steps()
        mode = ("every step" if len(sde_steps) == sch.num_steps else
                "ODE only" if not sde_steps else f"SDE at steps {','.join(map(str, sde_steps))}")
        d = sch.describe()
        text = (f"{d['leaves_per_prompt']} leaves, {d['rollout_nfe_per_prompt']} model evaluations and "
                f"{d['edges_per_prompt']} edges per prompt; fork noise scale {sch.split_noise_scale:g}"
                + (" (auto)" if not split_noise_scale else "") + f"; {mode}")
        warning = residual_noise_warning(sch)
        if warning:
            log.warning("Branch Schedule: %s", warning)
            text += "\nWARNING: " + warning
        return io.NodeOutput(sch, ui={"text": [text]})

    @staticmethod
    def build(steps, split_steps, branching, split_noise_scale, sde, eta, shift, group_size,
              sde_window_size, sde_window_start, sde_mode="auto") -> BranchSchedule:
        node = "Branch Schedule"
        try:
            splits = parse_steps(split_steps, "split_steps")
            ks = parse_steps(branching, "branching")
            if not ks:
                raise ValueError("branching is empty; give a factor such as 2.")
            scale = split_noise_scale if split_noise_scale > 0 else auto_split_noise_scale(sde)
            sch = BranchSchedule(num_steps=steps, split_steps=splits, branching=ks[0] if len(ks) == 1 else ks,
                                 split_noise_scale=scale, sde=sde, eta=eta, shift=shift,
                                 group_size=group_size,
                                 sde_window=sde_window_of(sde_mode or "auto", sde_window_size, sde_window_start,
                                                          bool(splits)))
            sch.validate(node)
        except ValueError as e:
            raise e if str(e).startswith(node) else _node_error(node, e)
        return sch


class TreeAdvantageNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTreeAdvantage", display_name="Tree Advantage (BranchGRPO)", category=T.CATEGORY,
            description="How leaf rewards become an advantage on every edge: fused up the tree (mean of the "
                        "leaves below, or path-probability weighted) and z-scored per depth inside each tree "
                        "('tree'), or GRPO's per-prompt z-score ('group').",
            inputs=[
                io.Combo.Input("mode", options=["tree", "group"], default="tree",
                               tooltip="'tree': BranchGRPO's per-depth normalisation. 'group': DanceGRPO/Flow-GRPO."),
                io.Combo.Input("fusion", options=["mean", "path_prob"], default="mean",
                               tooltip="Tree mode: a node's reward is the mean of its leaves, or a softmax over "
                                       "sibling edge log-probs (path-probability weighting)."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Path-probability fusion: softmax temperature (0 = uniform = mean)."),
                io.Boolean.Input("global_std", default=False, tooltip="Group mode: one std over the whole batch "
                                 "(Flow-GRPO) instead of per prompt."),
                io.Float.Input("clip", default=5.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Advantages are clamped to [-clip, clip] (5 in the official code)."),
            ],
            outputs=[T.Advantage.Output(display_name="advantage", tooltip="Advantage settings.")],
        )

    @classmethod
    def execute(cls, mode, fusion, temperature, global_std, clip) -> io.NodeOutput:
        cfg = AdvantageConfig(mode=mode, fusion=fusion, temperature=temperature, global_std=global_std, clip=clip)
        cfg.validate("Tree Advantage")
        return io.NodeOutput(cfg)


class PruningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOPruning", display_name="Pruning (BranchGRPO)", category=T.CATEGORY,
            description="Which edges enter the backward pass. Pruning leaves the rollout and the advantages "
                        "unchanged and cuts the update's cost: depth pruning drops whole depths (sliding "
                        "shallower over training), width pruning keeps only the best/worst post-split branches.",
            inputs=[
                io.String.Input("depths", default="", tooltip="Comma-separated child depths to drop (depth d = "
                                "the edge of step d-1), e.g. '16,17,18,19,20' (the paper's DepPru: 5 depths of "
                                "the 16-wide region, 8.625 trained edges per leaf). Empty = none."),
                io.Boolean.Input("depth_slide", default=True, tooltip="Move the pruned depths one shallower "
                                 "every 'slide_interval' iterations until 'stop_depth'."),
                io.Int.Input("slide_interval", default=30, min=1, max=100000, tooltip="Iterations per slide."),
                io.Int.Input("stop_depth", default=0, min=0, max=200, tooltip="Shallowest depth the slide "
                             "reaches (0 = the last split step, as in the official code)."),
                io.Combo.Input("width_mode", options=["off", "best_worst", "per_branch"], default="off",
                               tooltip="'best_worst': per tree keep the ratio of post-split edges with the highest "
                                       "and lowest advantages (half each). 'per_branch': the official mode 1."),
                io.Float.Input("width_ratio", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of post-split edges width pruning keeps."),
                io.Float.Input("active_fraction", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Prune only during this first fraction of the iterations."),
                io.Boolean.Input("train_last_step", default=True, tooltip="Train the final step's edges "
                                 "(their outcome is never scored; DanceGRPO drops them)."),
                io.Float.Input("timestep_fraction", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Train a random fraction of each trajectory's steps (DanceGRPO's 0.6)."),
            ],
            outputs=[T.Pruning.Output(display_name="pruning", tooltip="Pruning settings.")],
        )

    @classmethod
    def execute(cls, depths, depth_slide, slide_interval, stop_depth, width_mode, width_ratio, active_fraction,
                train_last_step, timestep_fraction) -> io.NodeOutput:
        try:
            d = parse_steps(depths, "depths")
        except ValueError as e:
            raise _node_error("Pruning", e)
        cfg = PruningConfig(depths=d, depth_slide=depth_slide, depth_slide_interval=slide_interval,
                            depth_stop=stop_depth or None, width_mode=width_mode, width_ratio=width_ratio,
                            active_fraction=active_fraction, train_last_step=train_last_step,
                            timestep_fraction=timestep_fraction)
        cfg.validate(200, "Pruning")
        return io.NodeOutput(cfg)


class TrainerSettingsNode(io.ComfyNode):
    """The Trainer's expert settings; every input comes from ``nodes.inputs.EXPERT_OPTIONS``."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTrainerSettings", display_name="Trainer Settings (BranchGRPO)", category=T.CATEGORY,
            description="Expert settings of the Trainer: which layers the adapter adapts (and whether bias and "
                        "norm deltas train too), the PPO clip and KL, "
                        "optimizer steps, batching and memory, true CFG and FLUX's distilled guidance. Connect to "
                        "the Trainer's 'settings' input (or Export Run Config's); without it the Trainer uses "
                        "these defaults.",
            inputs=[o.input(optional=True) for o in EXPERT_OPTIONS],
            outputs=[T.TrainerSettings.Output(display_name="settings", tooltip="Trainer settings.")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(TrainerSettings.of(kwargs))


class PromptsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOPrompts", display_name="Prompts (BranchGRPO)", category=T.CATEGORY,
            description="The training prompts: one per line, or a .txt file from ComfyUI's input folder (one "
                        "prompt per line). The last 'eval_count' prompts are held out for evaluation.",
            inputs=[
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor of a lighthouse",
                                tooltip="One prompt per line; blank lines and lines starting with # are ignored."),
                io.String.Input("file", default="", tooltip="Optional .txt file in ComfyUI's input folder (one "
                                "prompt per line), appended to the lines above."),
                io.Int.Input("eval_count", default=0, min=0, max=10000, tooltip="Prompts held out from training "
                             "(taken from the end of the list) for evaluation."),
            ],
            outputs=[T.Prompts.Output(display_name="prompts", tooltip="Training and held-out prompts.")],
        )

    @classmethod
    def execute(cls, prompts, file, eval_count) -> io.NodeOutput:
        lines = [ln.strip() for ln in prompts.splitlines()]
        if file.strip():
            base = os.path.realpath(core.folder_paths.get_input_directory())
            path = os.path.realpath(os.path.join(base, file.strip()))
            if not path.startswith(base + os.sep) or not os.path.isfile(path):
                raise ValueError(f"Prompts: file — {file!r} is not a file inside ComfyUI's input folder ({base}); "
                                 "put the .txt there and give its name.")
            with open(path, encoding="utf-8") as fh:
                lines += [ln.strip() for ln in fh]
        items = [ln for ln in lines if ln and not ln.startswith("#")]
        if not items:
            raise ValueError("Prompts: prompts — the prompt list is empty; write at least one prompt, one per line.")
        if eval_count >= len(items):
            raise ValueError(f"Prompts: eval_count — {eval_count} held-out prompts leave none of the "
                             f"{len(items)} for training; lower eval_count.")
        train, held = (items[:-eval_count], items[-eval_count:]) if eval_count else (items, [])
        return io.NodeOutput({"train": train, "eval": held},
                             ui={"text": [f"{len(train)} training prompts, {len(held)} held out"]})
