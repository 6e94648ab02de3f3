"""The layout of the repository: the product never imports the benchmark or the tests, and ships no test node.

``branchgrpo/``, ``nodes/``, ``demo/`` and the pack's ``__init__.py`` are what a registry install ships; ``bench/``
is run by hand. Arrows point from ``bench/`` into the product, never back: every Python file of the product is
parsed and each of its imports (absolute, relative, ``importlib.import_module("...")``) resolved to a module path.
The demo's tiny model lives in the product (``branchgrpo/models/toy_dit.py``) and still loads the shipped
``demo/tiny_t2i.safetensors``.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRODUCT = ("branchgrpo", "nodes", "demo")
FORBIDDEN = "bench"


def _imported_modules(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, dotted module)`` for every import in ``source``, relative ones resolved against ``package``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            up = node.level - 1  # `from .x` stays in `package`, each extra dot goes up one
            if not node.level:
                base = []
            else:
                base = list(package[:len(package) - up]) if up <= len(package) else ["<above the repository>"]
            mod = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, mod))
            if not node.module:  # `from .. import bench`
                found += [(node.lineno, ".".join(base + [a.name])) for a in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _bench_imports(source: str, package: tuple[str, ...]) -> list[str]:
    return [f"line {line}: {mod}" for line, mod in _imported_modules(source, package)
            if mod == FORBIDDEN or mod.startswith(FORBIDDEN + ".")]


def _product_files() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for top in PRODUCT:
        files += sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_the_checker_sees_every_kind_of_import():
    # the rule below would pass vacuously if the resolver missed a form; each of these must be caught
    cases = {
        "import bench.toy_model": ("nodes",),
        "from bench.pretrain import load_pretrained": ("demo",),
        "from ..bench.toy_model import ToyDiT": ("nodes",),
        "from ... import bench": ("branchgrpo", "models"),
        "import importlib\nimportlib.import_module('bench.toy')": ("branchgrpo",),
    }
    for src, package in cases.items():
        assert _bench_imports(src, package), src
    # and these are not imports of the benchmark
    for src, package in {"from .bench_utils import x": ("nodes",), "import benchmark": ("demo",),
                         "from . import pretrain": ("demo",), "from ..branchgrpo import models": ("nodes",)}.items():
        assert not _bench_imports(src, package), src


def test_product_never_imports_the_benchmark():
    files = _product_files()
    assert len(files) > 30 and any(p.name == "demo_model.py" for p in files)
    offenders = []
    for path in files:
        rel = path.relative_to(ROOT)
        package = rel.parent.parts  # the package a relative import starts from
        offenders += [f"{rel} {hit}" for hit in _bench_imports(path.read_text(encoding="utf-8"), package)]
    assert not offenders, "the product imports bench/ (move the code into the product instead):\n" + \
        "\n".join(offenders)


def _test_module_names() -> set[str]:
    """The top-level names a product file could import the test suite by: ``tests`` and every module or package
    directly in ``tests/`` (they are importable by those names whenever ``tests/`` is on ``sys.path``)."""
    names = {"tests"}
    for p in (ROOT / "tests").iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
    return names


def _test_imports(source: str, package: tuple[str, ...], names: set[str]) -> list[str]:
    return [f"line {line}: {mod}" for line, mod in _imported_modules(source, package)
            if mod.split(".")[0] in names or mod.startswith("tests.")]


def test_product_never_imports_the_tests():
    names = _test_module_names()
    assert {"tiny_models", "comfy_server", "comfy_dev_pack"} <= names
    assert _test_imports("from tiny_models import init_tensor", ("nodes",), names)  # the check can fail
    assert _test_imports("import comfy_dev_pack.tiny_flux", ("branchgrpo",), names)
    offenders = []
    for path in _product_files():
        rel = path.relative_to(ROOT)
        offenders += [f"{rel} {hit}" for hit in _test_imports(path.read_text(encoding="utf-8"), rel.parent.parts,
                                                              names)]
    assert not offenders, "the product imports the test suite:\n" + "\n".join(offenders)


def test_the_product_ships_no_test_node():
    """Every node id the product defines is a user's node: none of the suite's tiny-model nodes, no testing
    category, no environment switch that would register fixtures."""
    import re
    dev_ids = set()
    for path in (ROOT / "tests" / "comfy_dev_pack").glob("*.py"):
        dev_ids |= set(re.findall(r'node_id="([^"]+)"', path.read_text(encoding="utf-8")))
    assert {"BranchGRPOTinyFlowModelLoader", "BranchGRPOTinyFamilyModel"} <= dev_ids
    product_ids, offenders = set(), []
    for path in _product_files():
        text = path.read_text(encoding="utf-8")
        product_ids |= set(re.findall(r'node_id="([^"]+)"', text))
        if "/testing" in text or "DEV_NODES" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert "BranchGRPOTrainer" in product_ids
    assert not product_ids & dev_ids, product_ids & dev_ids
    assert not offenders, offenders


def test_the_benchmark_imports_the_product_model():
    import bench.pretrain
    import bench.toy
    from branchgrpo.models import toy_dit
    from demo import pretrain

    assert bench.toy.CLASS_NAMES is toy_dit.CLASS_NAMES
    assert bench.toy.load_velocity_model is pretrain.load_velocity_model is bench.pretrain.load_velocity_model
    assert pretrain.ToyDiT is toy_dit.ToyDiT


def test_shipped_demo_weights_load_into_the_product_model():
    from safetensors import safe_open
    from safetensors.torch import load_file

    from branchgrpo.models.toy_dit import CLASS_NAMES, ToyDiT, ToyDiTConfig, decode, sample

    path = ROOT / "demo" / "tiny_t2i.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert tuple(json.loads(meta["class_names"])) == CLASS_NAMES
    net = ToyDiT(ToyDiTConfig.from_dict(json.loads(meta["model_config"])))
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    net.eval()
    red, green = CLASS_NAMES.index("red circle"), CLASS_NAMES.index("green square")
    img = decode(sample(net, [red, red, green, green], steps=10, seed=0))  # [4, 16, 16, 3] in [0, 1]
    mean_rgb = img.mean(dim=(1, 2))
    assert torch.all(mean_rgb[:2, 0] > mean_rgb[:2, 1]), mean_rgb  # red circles: more red than green
    assert torch.all(mean_rgb[2:, 1] > mean_rgb[2:, 0]), mean_rgb  # green squares: more green than red


def _node_imports() -> dict[str, set[str]]:
    """``{module of nodes/: the modules of nodes/ it imports}``."""
    graph = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        mods = set()
        for _, mod in _imported_modules(path.read_text(encoding="utf-8"), ("nodes",)):
            parts = mod.split(".")
            if parts[0] == "nodes" and len(parts) > 1:
                mods.add(parts[1])
        graph[path.stem] = mods - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack + [n, m]
            if m not in state:
                found = visit(m, stack + [n])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def test_the_trainers_path_through_nodes_never_climbs_back_up():
    """The node modules import each other without a cycle, and what the Trainer calls (memory, the ComfyUI model,
    the adapters, model management) never imports the Trainer: a MODEL followed from ``execute`` goes down."""
    graph = _node_imports()
    assert {"memory", "comfy_model", "adapters"} <= graph["trainer"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) is not None  # the check can fail
    assert _cycle(graph) is None, _cycle(graph)
    for low in ("memory", "comfy_model", "adapters", "comfy_core", "shims"):
        assert "trainer" not in graph[low], low


#: ComfyUI's own modules (its public node schema ``comfy_api`` excepted)
COMFY_INTERNALS = ("comfy", "comfy_extras", "comfy_execution", "node_helpers", "folder_paths", "server",
                   "comfyui_version", "latent_preview", "execution")


def _comfy_imports(path: Path) -> list[str]:
    package = tuple(path.relative_to(ROOT).parts[:-1])
    return [f"{path.relative_to(ROOT)}:{line}: {mod}" for line, mod in
            _imported_modules(path.read_text(encoding="utf-8"), package) if mod.split(".")[0] in COMFY_INTERNALS]


def test_only_comfy_core_imports_comfyuis_internals():
    """One module holds ComfyUI's internals (``nodes/comfy_core.py``): no other file of the product imports
    ``comfy.*``, ``comfy_extras``, ``folder_paths``, ``server``, ... (``comfy_api`` is ComfyUI's public API)."""
    core = ROOT / "nodes" / "comfy_core.py"
    assert _comfy_imports(core), "the checker sees comfy_core's own imports"  # the check can fail
    others = [hit for path in _product_files() if path != core for hit in _comfy_imports(path)]
    assert not others, others
