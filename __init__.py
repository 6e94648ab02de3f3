"""ComfyUI-BranchGRPO: BranchGRPO reinforcement-learning fine-tuning of flow-matching models, as ComfyUI nodes.

Inside ComfyUI this module registers the nodes (V3 schema) and serves ``web/``. Outside ComfyUI (tests,
the command line) importing it does nothing: the engine is the plain package ``branchgrpo``.
"""
import os
import sys

WEB_DIRECTORY = "./web"

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # the engine package `branchgrpo` lives next to this file; appended, so
    sys.path.append(_here)  # that ComfyUI's own top-level modules (e.g. `nodes`) keep precedence

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # pragma: no cover - not running inside ComfyUI
    comfy_entrypoint = None
else:
    from .nodes import BranchGRPOExtension

    async def comfy_entrypoint() -> BranchGRPOExtension:
        return BranchGRPOExtension()
