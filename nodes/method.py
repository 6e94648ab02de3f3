"""Method: what a rollout trains, chosen beside the Branch Schedule (which says how it samples)."""
from __future__ import annotations

from comfy_api.latest import io

from branchgrpo.presets import method as method_defaults

from . import types as T

NODE = "Method (BranchGRPO)"
Method = io.Custom("BRANCHGRPO_METHOD")

METHOD_HELP = {
    "ppo": "PPO-clip on the rollout's SDE edges (BranchGRPO, DanceGRPO, Flow-GRPO, MixGRPO): each stochastic "
           "step's log-probability ratio, weighted by the edge's advantage. Needs SDE steps in the schedule.",
    "diffusionnft": "DiffusionNFT: trains on the leaves' clean images, re-noised at 9 timesteps, with implicit "
                    "positive/negative velocities built from the current and an EMA 'old' LoRA, weighted by the "
                    "advantage mapped to [0, 1]. Rollouts are sampled with the EMA LoRA. Any schedule (ODE is fine).",
    "awm": "Advantage Weighted Matching: trains on the leaves' clean images, re-noised at 6 timesteps; the "
           "flow-matching error is the log-likelihood inside a clipped PPO ratio, with KL to the base model and to "
           "an EMA LoRA. Any schedule.",
    "dgpo": "DGPO: trains on the leaves' clean images, re-noised at 4 early timesteps (shared noise per prompt): "
            "each prompt's better samples should improve their denoising error over the base model more than its "
            "worse ones (a DPO-style group preference). Any schedule.",
}


class MethodNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOMethod", display_name=NODE, category=T.CATEGORY, is_experimental=True,
            description="What the Trainer trains on each rollout. 'ppo' is BranchGRPO's update on the tree's "
                        "stochastic edges. The forward-process methods (diffusionnft, awm, dgpo) train on the "
                        "leaves' clean images with a flow-matching loss, so they need no SDE log-probability: pair "
                        "them with a Branch Schedule whose sde_mode is 'forks only' (the tree) or 'none' (a flat "
                        "group: no split steps, group_size 16); the Trainer notes an all-SDE schedule on its node. Defaults are each method's "
                        "official ones (docs/methods.md).",
            inputs=[
                io.Combo.Input("method", options=list(METHOD_HELP), default="ppo",
                               tooltip=" | ".join(f"{k}: {v}" for k, v in METHOD_HELP.items())),
                io.Int.Input("train_timesteps", default=0, min=0, max=100,
                             tooltip="Forward-process methods: re-noising timesteps per image and iteration "
                                     "(0 = the method's default: diffusionnft 9, awm 6, dgpo 4). Each costs one "
                                     "forward with gradients per image, plus one per EMA or reference pass. "
                                     "Ignored by ppo."),
                io.Float.Input("kl_beta", default=-1.0, min=-1.0, max=10.0, step=1e-4,
                               tooltip="Forward-process methods: weight of mean((v - v_base)^2) to the base model "
                                       "(-1 = the method's default: diffusionnft 1e-4, awm 1e-3, dgpo 0.02; 0 skips "
                                       "the base model's forward). ppo's KL is on the Trainer Settings."),
            ],
            outputs=[Method.Output(display_name="method", tooltip="The Trainer's optional 'method' input.")],
        )

    @classmethod
    def execute(cls, method="ppo", train_timesteps=0, kl_beta=-1.0) -> io.NodeOutput:
        try:
            obj = method_defaults(method)
        except ValueError as e:
            raise ValueError(f"{NODE}: method — {e}") from None
        if train_timesteps > 0:
            obj.train_timesteps = int(train_timesteps)
        # what the user set on this node (not a config field): the Trainer, which sees the schedule, refuses an
        # explicit train_timesteps the schedule cannot give, and only notes a default it trims
        obj.requested = {"train_timesteps": int(train_timesteps)} if train_timesteps > 0 else {}
        if kl_beta >= 0:
            obj.kl_beta = float(kl_beta)
        try:
            obj.validate(NODE)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(obj)


__all__ = ["MethodNode", "Method", "METHOD_HELP"]
