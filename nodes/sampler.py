"""Tree Sampler: the branching sampler on its own (MODEL + conditioning + latent -> the leaves)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from branchgrpo.schedule import BranchSchedule
from branchgrpo.tree import rollout

from . import types as T
from .comfy_model import ComfyFlowModel, require_flow_model

NODE = "BranchGRPO Tree Sampler"


class TreeSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOTreeSampler", display_name="Tree Sampler (BranchGRPO)", category=T.CATEGORY,
            description="Samples one branching tree from noise with the schedule and returns its leaves as a "
                        "LATENT batch (the clean-image prediction of the last step, which is what a reward scores), "
                        "plus the tree record. Decode the leaves with VAE Decode to see what a rollout produces.",
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="A flow-matching model."),
                io.Conditioning.Input("positive", tooltip="Conditioning of the prompt."),
                io.Latent.Input("latent", tooltip="An empty latent: its shape sets the resolution (batch ignored)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of the root noise and forks."),
                T.Schedule.Input("schedule", optional=True, tooltip="Branch schedule (default: paper's)."),
                io.Int.Input("max_batch", default=16, min=1, max=1024, optional=True,
                             tooltip="Most latents per model call."),
            ],
            outputs=[
                io.Latent.Output(display_name="leaves", tooltip="The leaves (one latent per leaf)."),
                T.Tree.Output(display_name="tree", tooltip="The tree record: structure, log-probs, evaluations."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, seed, schedule=None, max_batch=16) -> io.NodeOutput:
        require_flow_model(model, NODE)
        schedule = schedule or BranchSchedule()
        schedule.validate(NODE)
        shape = tuple(latent["samples"].shape[1:])
        flow = ComfyFlowModel(model, shape, conditioning={"prompt": positive}, guidance=None, seed=seed)
        with flow.session(max_batch):
            tree = rollout(flow, flow.encode(["prompt"]), 1, schedule, shape,
                           generator=torch.Generator().manual_seed(seed), max_batch=max_batch, device=flow.device)
            leaves = flow.to_vae_latent(tree.leaf_x0).float().cpu()
        text = f"{tree.leaves.numel()} leaves from {tree.nfe} model evaluations; {tree.num_edges} edges"
        return io.NodeOutput({"samples": leaves}, tree, ui={"text": [text]})
