"""The Trainer's preview and health metrics in a real ComfyUI: a tiny training run with held-out prompts streams
one binary preview image per iteration over the websocket (best | worst leaf | evaluation samples), and its
history carries the reward spread, the KL to the base model and the held-out ODE reward."""
from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

import tiny_models as tm
from test_comfy_training import training_graph

pytestmark = pytest.mark.comfy
PREVIEW_IMAGE, JPEG = 1, 1  # ComfyUI's protocol.BinaryEventTypes.PREVIEW_IMAGE and its JPEG image type


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def test_training_streams_previews_to_the_trainer_node_and_records_health_metrics(comfy, models):
    if not comfy.websocket_connected:
        pytest.skip("websocket-client is not installed: binary events cannot be read")
    iterations = 2
    graph = training_graph(models, "preview_run", iterations=iterations, lora_file="branchgrpo/preview_lora",
                           prompts="a red cube\na blue ball\na green cone")
    graph["prompts"]["inputs"]["eval_count"] = 1  # "a green cone" is held out and evaluated
    start = len(comfy.messages)
    pid = comfy.queue(graph)
    entry = comfy.wait(pid, timeout=300)
    assert comfy.error_for(pid, entry) is None, comfy.error_for(pid, entry)
    msgs = comfy.messages[start:]
    previews = []
    for i, m in enumerate(msgs):
        if m["type"] != "binary":
            continue
        event, kind = struct.unpack(">II", m["data"][:8])
        if event != PREVIEW_IMAGE:
            continue
        assert kind == JPEG
        # the progress message just before names the node the preview belongs to
        progress = next(p for p in reversed(msgs[:i]) if p.get("type") == "progress")
        previews.append((progress["data"]["node"], Image.open(io.BytesIO(m["data"][8:])).convert("RGB")))
    assert len(previews) == iterations, [n for n, _ in previews]
    assert {node for node, _ in previews} == {"trainer"}
    for _, img in previews:
        # best | worst | two evaluation samples (1 held-out prompt x 2 seeds), 160 px tiles + caption, scaled
        # to fit ComfyUI's 512 px preview
        assert img.width == 512 and abs(img.width / img.height - (4 * 160 + 3 * 4) / (160 + 14)) < 0.05
        assert max(img.getextrema(), key=lambda e: e[1] - e[0]) != (0, 0)  # not a blank image

    history = entry["outputs"]
    metrics = [m for m in comfy.messages_for(pid, "branchgrpo.metrics")]
    assert [m["data"]["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        data = m["data"]["metrics"]
        assert data["kl_ref"] is not None and data["kl_ref"] >= 0 and data["nfe_metrics"] > 0
        assert data["reward_spread"] is not None and data["grad_norm"] is not None
        assert data["eval_reward"] is not None and data["nfe_eval"] == 2 * 6  # 2 samples x 6 Euler steps
    assert metrics[-1]["data"]["metrics"]["kl_ref"] > 0  # the adapter has moved after two updates
    assert "plot_out" in history
