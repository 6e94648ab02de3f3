"""Values of a queued prompt that are known before it runs: literals, and the outputs of pure value nodes.

A Save LoRA whose ``filename`` comes through a link (a String primitive, a Concatenate of literals) must be
refused before hours of training, as a literal name is. ComfyUI executes nothing before the Trainer, so the
value is worked out here: a literal is itself; a link to one of ComfyUI's primitive or string nodes (the modules
``comfy_extras.nodes_primitive`` and ``comfy_extras.nodes_string``: pure functions of their inputs, cheap; their
menu categories were renamed in 2026, their modules were not) whose own inputs are all known is that node run on
them. Anything else (a model loader, a custom node) is :data:`UNKNOWN`.
"""
from __future__ import annotations

import logging

log = logging.getLogger("BranchGRPO")

UNKNOWN = object()
PURE_MODULES = ("comfy_extras.nodes_primitive", "comfy_extras.nodes_string")
MAX_DEPTH = 16


def _node_class(class_type: str):
    try:
        import nodes as comfy_nodes  # ComfyUI's top-level nodes.py (the pack's own package is relative)
    except ImportError:
        return None
    return getattr(comfy_nodes, "NODE_CLASS_MAPPINGS", {}).get(class_type)


def _is_pure(cls) -> bool:
    # the module is named "comfy_extras.nodes_string" (0.3.75) or by its path, ".../comfy_extras/nodes_string" (0.33)
    module = str(getattr(cls, "__module__", "")).replace("\\", ".").replace("/", ".").removesuffix(".py")
    return module.endswith(PURE_MODULES)


def _run_pure(cls, inputs: dict, index: int):
    if hasattr(cls, "define_schema"):
        out = cls.execute(**inputs)
        result = getattr(out, "result", out)
    else:
        result = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(result, dict):
            result = result.get("result")
    return result[index]


def known_value(prompt: dict, value, depth: int = 0):
    """``value`` (an input of a node of ``prompt``, the API format) if it can be known before execution,
    else :data:`UNKNOWN`."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
        return value
    if depth >= MAX_DEPTH:
        return UNKNOWN
    node = prompt.get(str(value[0])) if isinstance(prompt, dict) else None
    if not isinstance(node, dict):
        return UNKNOWN
    cls = _node_class(node.get("class_type", ""))
    if cls is None or not _is_pure(cls):
        return UNKNOWN
    inputs = {}
    for name, v in (node.get("inputs") or {}).items():
        v = known_value(prompt, v, depth + 1)
        if v is UNKNOWN:
            return UNKNOWN
        inputs[name] = v
    try:
        return _run_pure(cls, inputs, value[1])
    except Exception as e:  # noqa: BLE001 - it will fail again when it runs, on its own node
        log.debug("BranchGRPO: %s could not be evaluated ahead (%s)", node.get("class_type"), e)
        return UNKNOWN


def source_name(prompt: dict, value) -> str:
    """``node 7 (PrimitiveString)`` for a link, for messages."""
    node = prompt.get(str(value[0]), {}) if isinstance(value, list) and value else {}
    return f"node {value[0]} ({node.get('class_type', '?')})" if isinstance(value, list) and value else "a link"
