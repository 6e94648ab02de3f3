"""Test-only nodes are not in the product.

The tiny random-weight models, text encoders and VAEs the suite builds families with live in the suite's own
custom-node folder (``tests/comfy_dev_pack``), which only the test server links into ``custom_nodes/``. A server
started as a user starts it (the pack alone) lists every user node of the pack, and no fixture.
"""
from __future__ import annotations

import pytest

from comfy_server import ComfyClient, ComfyServer, comfy_missing_reason

TINY = "BranchGRPOTinyFlowModelLoader"
DEV_NODES = {TINY, "BranchGRPOTinyFamilyModel", "BranchGRPOTinyTextEncoder", "BranchGRPOTinyVAE"}
DEV_CATEGORY = "BranchGRPO/testing"
USER_NODES = {"BranchGRPOTrainer", "BranchGRPODemoModelLoader", "BranchGRPOExportRunConfig", "BranchGRPOSaveLoRA"}


def _pack_nodes(info: dict) -> dict[str, str]:
    """node id -> category, for the pack's nodes."""
    return {name: str(spec.get("category", "")) for name, spec in info.items()
            if str(spec.get("category", "")).startswith("BranchGRPO")}


@pytest.mark.comfy
@pytest.mark.skipif(comfy_missing_reason() is not None, reason=str(comfy_missing_reason()))
def test_test_nodes_come_only_from_the_suites_own_folder(comfy, tmp_path):
    with_dev = _pack_nodes(comfy.object_info())
    assert DEV_NODES <= set(with_dev) and USER_NODES <= set(with_dev)

    with ComfyServer(tmp_path / "base", dev_pack=False) as server:
        client = ComfyClient(server.url, server=server, use_websocket=False)
        try:
            without = _pack_nodes(client.object_info())
        finally:
            client.close()
    assert not DEV_NODES & set(without), "a test fixture appears in a user's node menu"
    assert USER_NODES <= set(without) and set(without) <= set(with_dev)
    assert not [n for n, cat in without.items() if cat == DEV_CATEGORY], "a test node in a user's menu"
    assert all(with_dev[n] == DEV_CATEGORY for n in set(with_dev) - set(without))  # only test nodes are missing
