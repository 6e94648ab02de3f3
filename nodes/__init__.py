"""ComfyUI nodes of the pack: thin wrappers that build engine objects and call ``branchgrpo``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .demo_model import DemoModelLoaderNode
from .export_config import ExportRunConfigNode
from .lora_io import SaveLoRANode
from .method import MethodNode
from .plot import MetricsPlotNode
from .reference import EditPromptsNode
from .rewards import REWARD_NODES
from . import routes  # noqa: F401  (registers GET /branchgrpo/runs/{run}, read by web/branchgrpo.js)
from .sampler import TreeSamplerNode
from .settings import BranchScheduleNode, PromptsNode, PruningNode, TrainerSettingsNode, TreeAdvantageNode
from .trainer import TrainerNode
from .tree_view import TreeViewNode

NODES: list[type[io.ComfyNode]] = [
    BranchScheduleNode, TreeAdvantageNode, PruningNode, PromptsNode, TreeSamplerNode, TreeViewNode, TrainerNode,
    TrainerSettingsNode, SaveLoRANode, EditPromptsNode,
    MetricsPlotNode, *REWARD_NODES,
    ExportRunConfigNode, DemoModelLoaderNode, MethodNode,
]


class BranchGRPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
