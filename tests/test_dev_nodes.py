"""Test-only nodes stay out of a user's node menu.

The Tiny Random Flow Model (a random-weight FLUX for the tests) is registered only when ComfyUI runs with
``BRANCHGRPO_DEV_NODES=1``, which the test suite's server sets (tests/comfy_server.py). A server started as a
user starts it (no such variable) lists every user node of the pack, and not the fixture.
"""
from __future__ import annotations

import pytest

from comfy_server import ComfyClient, ComfyServer, comfy_missing_reason

TINY = "BranchGRPOTinyFlowModelLoader"
DEV_CATEGORY = "BranchGRPO/testing"
USER_NODES = {"BranchGRPOTrainer", "BranchGRPODemoModelLoader", "BranchGRPOExportRunConfig", "BranchGRPOSaveLoRA"}


def _pack_nodes(info: dict) -> dict[str, str]:
    """node id -> category, for the pack's nodes."""
    return {name: str(spec.get("category", "")) for name, spec in info.items()
            if str(spec.get("category", "")).startswith("BranchGRPO")}


@pytest.mark.comfy
@pytest.mark.skipif(comfy_missing_reason() is not None, reason=str(comfy_missing_reason()))
def test_test_nodes_are_listed_only_with_the_dev_variable(comfy, tmp_path):
    with_var = _pack_nodes(comfy.object_info())
    assert TINY in with_var and USER_NODES <= set(with_var)  # the suite's server sets BRANCHGRPO_DEV_NODES=1

    with ComfyServer(tmp_path / "base", env={"BRANCHGRPO_DEV_NODES": ""}) as server:
        client = ComfyClient(server.url, server=server, use_websocket=False)
        try:
            without = _pack_nodes(client.object_info())
        finally:
            client.close()
    assert TINY not in without, "the test fixture appears in a user's node menu"
    assert USER_NODES <= set(without) and set(without) <= set(with_var)
    assert not [n for n, cat in without.items() if cat == DEV_CATEGORY], "a test node in a user's menu"
    assert all(with_var[n] == DEV_CATEGORY for n in set(with_var) - set(without))  # only test nodes are hidden
