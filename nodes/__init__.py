"""ComfyUI nodes of the pack: thin wrappers that build engine objects and call ``branchgrpo``."""
from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension, io

from .demo_model import DemoModelLoaderNode
from .dev_nodes import DEV_NODES as FAMILY_DEV_NODES
from .export_config import ExportRunConfigNode
from .lora_io import SaveLoRANode
from .method import MethodNode
from .plot import MetricsPlotNode
from .reference import EditPromptsNode
from .rewards import REWARD_NODES
from . import routes  # noqa: F401  (registers GET /branchgrpo/runs/{run}, read by web/branchgrpo.js)
from .sampler import TreeSamplerNode
from .settings import BranchScheduleNode, PromptsNode, PruningNode, TrainerSettingsNode, TreeAdvantageNode
from .tiny_model import TinyFlowModelLoaderNode
from .trainer import TrainerNode
from .tree_view import TreeViewNode

NODES: list[type[io.ComfyNode]] = [
    BranchScheduleNode, TreeAdvantageNode, PruningNode, PromptsNode, TreeSamplerNode, TreeViewNode, TrainerNode,
    TrainerSettingsNode, SaveLoRANode, EditPromptsNode,
    MetricsPlotNode, *REWARD_NODES,
    ExportRunConfigNode, DemoModelLoaderNode, MethodNode,
]
#: Test fixtures, not for users' menus: registered only when the server runs with BRANCHGRPO_DEV_NODES=1
#: (the test suite's ComfyUI server sets it).
DEV_NODES: list[type[io.ComfyNode]] = [TinyFlowModelLoaderNode, *FAMILY_DEV_NODES]
DEV_NODES_ENV = "BRANCHGRPO_DEV_NODES"


def dev_nodes_enabled(environ=None) -> bool:
    value = (os.environ if environ is None else environ).get(DEV_NODES_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


class BranchGRPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES) + (list(DEV_NODES) if dev_nodes_enabled() else [])
