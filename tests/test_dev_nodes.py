"""Test-only nodes stay out of a user's node menu.

The Tiny Random Flow Model (a random-weight FLUX for the tests) is registered only when ComfyUI runs with
``BRANCHGRPO_DEV_NODES=1``, which the test suite's server sets (tests/comfy_server.py). A server started as a
user starts it (no such variable) lists every user node of the pack, and not the fixture.
"""
from __future__ import annotations

import pytest

from comfy_server import ComfyClient, ComfyServer, comfy_missing_reason

TINY = "BranchGRPOTinyFlowModelLoader"
USER_NODES = {"BranchGRPOTrainer", "BranchGRPODemoModelLoader", "BranchGRPOExportRunConfig", "BranchGRPOSaveLoRA"}


def _pack_nodes(info: dict) -> set[str]:
    return {name for name, spec in info.items() if str(spec.get("category", "")).startswith("BranchGRPO")}


@pytest.mark.comfy
@pytest.mark.skipif(comfy_missing_reason() is not None, reason=str(comfy_missing_reason()))
def test_tiny_model_is_listed_only_with_the_dev_variable(comfy, tmp_path):
    with_var = _pack_nodes(comfy.object_info())
    assert TINY in with_var and USER_NODES <= with_var  # the suite's server sets BRANCHGRPO_DEV_NODES=1

    with ComfyServer(tmp_path / "base", env={"BRANCHGRPO_DEV_NODES": ""}) as server:
        client = ComfyClient(server.url, server=server, use_websocket=False)
        try:
            info = client.object_info()
        finally:
            client.close()
    without = _pack_nodes(info)
    assert TINY not in info, "the test fixture appears in a user's node menu"
    dev = {TINY, "BranchGRPOTinyFamilyModel", "BranchGRPOTinyTextEncoder", "BranchGRPOTinyVAE"}
    assert not dev & without
    assert without == with_var - dev  # every other node of the pack is still there
