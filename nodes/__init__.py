"""ComfyUI nodes of the pack: thin wrappers that build engine objects and call ``branchgrpo``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .demo_model import DemoModelLoaderNode
from .export_config import ExportRunConfigNode
from .lora_io import SaveLoRANode
from .plot import MetricsPlotNode
from .rewards import REWARD_NODES
from . import routes  # noqa: F401  (registers GET /branchgrpo/runs/{run}, read by web/branchgrpo.js)
from .sampler import TreeSamplerNode
from .settings import BranchScheduleNode, PromptsNode, PruningNode, TreeAdvantageNode
from .tiny_model import TinyFlowModelLoaderNode
from .trainer import TrainerNode

NODES: list[type[io.ComfyNode]] = [
    BranchScheduleNode, TreeAdvantageNode, PruningNode, PromptsNode, TreeSamplerNode, TrainerNode, SaveLoRANode,
    MetricsPlotNode, *REWARD_NODES,
    TinyFlowModelLoaderNode, ExportRunConfigNode, DemoModelLoaderNode,
]


class BranchGRPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
