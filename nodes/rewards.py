"""Reward loader nodes (thin: the scorers live in branchgrpo/rewards/)."""
from __future__ import annotations

from comfy_api.latest import io

from branchgrpo.rewards.weight_free import WEIGHT_FREE_REWARDS, make_weight_free

from . import types as T


class WeightFreeRewardNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOWeightFreeReward", display_name="Weight-free Reward (BranchGRPO)",
            category=T.CATEGORY + "/rewards",
            description="Rewards that need no model weights: DDPO's JPEG compressibility / incompressibility and "
                        "simple image statistics (colourfulness, saturation, brightness, contrast). Useful for "
                        "demos, CPU runs and sanity checks.",
            inputs=[io.Combo.Input("reward", options=sorted(WEIGHT_FREE_REWARDS), default="jpeg_compressibility",
                                   tooltip="Which weight-free reward to use.")],
            outputs=[T.RewardModel.Output(display_name="reward", tooltip="The reward model.")],
        )

    @classmethod
    def execute(cls, reward) -> io.NodeOutput:
        return io.NodeOutput(make_weight_free(reward))
