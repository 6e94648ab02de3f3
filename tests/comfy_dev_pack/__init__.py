"""The test suite's own ComfyUI custom-node folder: tiny random-weight models, text encoders and VAEs.

``tests/comfy_server.py`` links it into the test server's ``custom_nodes/`` next to the pack, so the tests can
build every flow family in seconds; a user's install of the pack never has it (it is not under the pack's
nodes). The random weights come from :func:`bench.families.init_tensor` (the project's one initialiser) and the CLIP /
VAE protocol from the product's ``nodes/shims.py``.
"""
import importlib.util
import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # through the custom_nodes link
REPO_ROOT = os.path.dirname(TESTS_DIR)
CATEGORY = "BranchGRPO/testing"
for _path in (TESTS_DIR, REPO_ROOT):  # tiny_models, and bench.families behind it (the one random initialiser)
    if _path not in sys.path:
        sys.path.append(_path)


def product_module(relative: str):
    """A torch-only module of the product, loaded from its file (the pack's own package name is ComfyUI's
    choice, so it is not imported by name)."""
    name = "branchgrpo_dev_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, relative))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # pragma: no cover - not inside ComfyUI
    comfy_entrypoint = None
else:
    class DevExtension(ComfyExtension):
        async def get_node_list(self):
            from .families import FAMILY_NODES
            from .oom import OutOfMemoryInjectorNode
            from .tiny_flux import TinyFlowModelLoaderNode
            return [TinyFlowModelLoaderNode, *FAMILY_NODES, OutOfMemoryInjectorNode]

    async def comfy_entrypoint() -> DevExtension:
        return DevExtension()
