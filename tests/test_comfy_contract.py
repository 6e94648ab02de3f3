"""The pack's contract with ComfyUI's internals, checked against each core's source without importing it.

Two kinds of names, read with ``ast`` (no torch, no ComfyUI import; seconds):

* every module-level internal the product names: ``import comfy.X`` / ``from comfy.X import name`` and every
  ``comfy.X.name`` (also through an alias, ``import comfy.model_management as mm`` -> ``mm.name``), plus the
  top-level ComfyUI modules it imports (``folder_paths``, ``node_helpers``, ``server``, ...). Collected from
  the product's files, so a new call is covered the day it is written;
* :data:`METHODS`, the methods and attributes the pack uses on ComfyUI's objects (a patcher, a model), with
  the keyword arguments it passes: the class must define them (or inherit them from a class of the same file).

A core that removes or renames one fails here, in seconds, with the name. ``comfy_api.latest`` is ComfyUI's
public API and is not checked here (the server tests use it on every core).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py")), *sorted((ROOT / "branchgrpo").rglob("*.py"))]
TOP_LEVEL = {"folder_paths", "node_helpers", "server", "comfyui_version", "nodes", "latent_preview"}


def cores() -> dict[str, Path]:
    """The cores of the suite: .comfyui/ (0.3.75), .comfyui-0.33/ (0.33.0) and $BRANCHGRPO_COMFYUI_DIR."""
    found = {}
    for d in (ROOT / ".comfyui", ROOT / ".comfyui-0.33", Path(os.environ.get("BRANCHGRPO_COMFYUI_DIR", ROOT / ".comfyui"))):
        version = d / "comfyui_version.py"
        if version.is_file():
            text = version.read_text()
            found[text.split('"')[1] if '"' in text else d.name] = d
    return found


# (file in the core, class, member, keyword arguments the pack passes)
METHODS = [
    ("comfy/model_patcher.py", "ModelPatcher", "clone", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "add_weight_wrapper", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "get_model_object", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "model_size", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "model_dtype", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "pre_run", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "cleanup", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "restore_hook_patches", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "set_model_unet_function_wrapper", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "__init__", ("load_device", "offload_device")),
    ("comfy/model_patcher.py", "ModelPatcher", "weight_wrapper_patches", ()),
    ("comfy/model_patcher.py", "ModelPatcher", "model_options", ()),
    ("comfy/model_base.py", "BaseModel", "process_latent_out", ()),
    ("comfy/model_base.py", "BaseModel", "get_dtype", ()),
    ("comfy/model_base.py", "BaseModel", "manual_cast_dtype", ()),
    ("comfy/model_base.py", "BaseModel", "current_patcher", ()),
    ("comfy/model_base.py", "BaseModel", "latent_format", ()),
    ("comfy/model_base.py", "BaseModel", "model_config", ()),
    ("comfy/model_management.py", "LoadedModel", "model_unload", ()),
    ("comfy/supported_models_base.py", "BASE", "get_model", ()),
    ("comfy/supported_models_base.py", "BASE", "set_inference_dtype", ()),
    ("comfy/sd.py", "VAE", "decode", ()),
    ("comfy/sd.py", "VAE", "memory_used_decode", ()),
    ("comfy/sd.py", "CLIP", "tokenize", ()),
    ("comfy/sd.py", "CLIP", "encode_from_tokens_scheduled", ()),
    ("comfy/weight_adapter/base.py", "WeightAdapterBase", "to_train", ()),
    ("comfy/weight_adapter/base.py", "WeightAdapterTrainBase", "__init__", ()),
]


# ----------------------------------------------------------------------------------------------- collecting
def _module_file(core: Path, dotted: str) -> Path | None:
    base = core.joinpath(*dotted.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


CORE_MODULE = ROOT / "nodes" / "comfy_core.py"


def core_aliases() -> dict[str, str]:
    """The names ``nodes/comfy_core.py`` binds to ComfyUI modules at its top level (``mm`` ->
    ``comfy.model_management``, ``samplers`` -> ``comfy.samplers``, ``folder_paths`` -> ``folder_paths``): what
    the other modules reach through it (``core.mm.get_torch_device``)."""
    out = {}
    for node in ast.parse(CORE_MODULE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "comfy" or a.name in TOP_LEVEL:
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    return out


def used_names() -> set[tuple[str, ...]]:
    """Every ComfyUI internal the product names: ``(module,)`` for an import, ``(module, name)`` for a
    ``from module import name``, and the dotted chain of an attribute reference rooted at an imported ComfyUI
    module (``("comfy", "model_management", "get_torch_device")``; aliases resolved). Which part of a chain is
    the module is decided against each core (:func:`missing_in`)."""
    out: set[tuple[str, ...]] = set()
    aliases = core_aliases()
    for path in PRODUCT:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots: dict[str, str] = {}  # a name bound by an import in this file -> the module it is
        through_core: set[str] = set()  # names this file binds to nodes/comfy_core.py
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "comfy" or a.name in TOP_LEVEL:
                        out.add(tuple(a.name.split(".")))
                        roots[a.asname] = a.name if a.asname else None
                        if not a.asname:
                            roots[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] == "comfy" or node.module in TOP_LEVEL:
                    for a in node.names:
                        out.add((*node.module.split("."), a.name))
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "comfy_core":
                for a in node.names:  # from .comfy_core import mm
                    if a.name in aliases:
                        roots[a.asname or a.name] = aliases[a.name]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                for a in node.names:  # from . import comfy_core as core: core.mm.x -> comfy.model_management.x
                    if a.name == "comfy_core":
                        through_core.add(a.asname or a.name)
        roots = {k: v for k, v in roots.items() if k and v}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            chain.reverse()
            full = None
            if isinstance(cur, ast.Name) and cur.id in through_core and chain[0] in aliases and len(chain) > 1:
                full = tuple(aliases[chain[0]].split(".")) + tuple(chain[1:])
            elif isinstance(cur, ast.Name) and cur.id in roots:
                full = tuple(roots[cur.id].split(".")) + tuple(chain)
            if full is not None:
                if not any(part.startswith("__") for part in full):
                    out.add(full)
    return out


def module_defines(path: Path) -> set[str]:
    """Names bound at module level in ``path`` (defs, classes, assignments, imports), and its submodules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            names.add(n.id)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for a in sub.names:
                    names.add((a.asname or a.name).split(".")[0])
    if path.name == "__init__.py":
        names |= {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
    return names


def class_members(path: Path, cls: str) -> dict[str, ast.AST]:
    """Members of ``cls`` in ``path``: its defs, class-level names and ``self.x`` assignments, with those of its
    bases defined in the same file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, ast.AST] = {}
    todo, seen = [cls], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        node = classes[name]
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(item.name, item)
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                for t in (item.targets if isinstance(item, ast.Assign) else [item.target]):
                    if isinstance(t, ast.Name):
                        out.setdefault(t.id, item)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                    and isinstance(sub.ctx, ast.Store):
                out.setdefault(sub.attr, sub)
        todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
    return out


def missing_in(core: Path, names=None, methods=None) -> list[str]:
    """Every used name or manifest entry ``core`` lacks, as ``module.name`` / ``Class.member(kwarg)``."""
    missing = []
    for chain in sorted(names if names is not None else used_names()):
        k = len(chain)  # the longest prefix that is a module of the core; the next part must be bound in it
        while k > 0 and _module_file(core, ".".join(chain[:k])) is None:
            k -= 1
        if k == 0:
            missing.append(".".join(chain))
        elif k < len(chain) and chain[k] not in module_defines(_module_file(core, ".".join(chain[:k]))):
            missing.append(".".join(chain[:k + 1]))
    for file, cls, member, kwargs in (methods if methods is not None else METHODS):
        path = core / file
        members = class_members(path, cls) if path.is_file() else {}
        if member not in members:
            missing.append(f"{file}: {cls}.{member}")
            continue
        fn = members[member]
        if kwargs and isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            if fn.args.kwarg is None:
                missing += [f"{file}: {cls}.{member}({k}=)" for k in kwargs if k not in params]
    return missing


# ----------------------------------------------------------------------------------------------- tests
CORES = cores()


def test_the_pack_names_internals_and_the_collector_sees_each_form():
    names = used_names()
    assert ("comfy", "model_management", "get_torch_device") in names  # comfy.X.name
    assert ("comfy", "model_management", "soft_empty_cache") in names  # through an alias (mm.)
    assert ("comfy", "model_management", "get_free_memory") in names  # through comfy_core (core.mm.)
    assert ("comfy", "samplers", "CFGGuider") in names or ("comfy", "samplers", "sampling_function") in names
    assert ("comfy", "weight_adapter", "adapter_maps") in names
    assert ("folder_paths", "get_full_path") in names
    assert ("comfy", "samplers", "sampling_function") in names
    assert ("comfy", "weight_adapter", "lora", "LoraDiff") in names  # from comfy.X.Y import name
    assert len(names) > 40, len(names)


@pytest.mark.skipif(not CORES, reason="no ComfyUI tree: run scripts/setup_dev.sh")
@pytest.mark.parametrize("version", sorted(CORES))
def test_every_internal_the_pack_uses_exists_in_the_core(version):
    missing = missing_in(CORES[version])
    assert not missing, f"ComfyUI {version} lacks what the pack calls: {missing}"


@pytest.mark.skipif(not CORES, reason="no ComfyUI tree: run scripts/setup_dev.sh")
def test_a_planted_missing_name_fails_the_contract():
    core = next(iter(CORES.values()))
    assert missing_in(core, names={("comfy", "model_management", "no_such_function_planted")}, methods=[]) == \
        ["comfy.model_management.no_such_function_planted"]
    assert missing_in(core, names={("comfy", "no_such_module_planted")}, methods=[]) == \
        ["comfy.no_such_module_planted"]
    assert missing_in(core, names=set(), methods=[("comfy/model_patcher.py", "ModelPatcher", "planted_method", ())]) \
        == ["comfy/model_patcher.py: ModelPatcher.planted_method"]
    assert missing_in(core, names=set(),
                      methods=[("comfy/model_patcher.py", "ModelPatcher", "__init__", ("planted_kwarg",))]) == \
        ["comfy/model_patcher.py: ModelPatcher.__init__(planted_kwarg=)"]
