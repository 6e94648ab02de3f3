"""The Trainer's memory settings in the real ComfyUI server: an fp8 base and models released after their phase."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from test_comfy_training import models, predict_nodes, read_latent, training_graph  # noqa: F401  (fixture)

pytestmark = pytest.mark.comfy


def test_fp8_base_with_release_trains_and_the_lora_fits_the_full_model(comfy, comfy_base, models):  # noqa: F811
    graph = training_graph(models, "fp8_release", lora_file="branchgrpo/fp8_lora",
                           extra=predict_nodes("fp8_trained", ["trainer", 0]))
    graph["trainer_settings"]["inputs"].update({"base_weights": "fp8_e4m3fn", "release_models": "on"})
    log0 = len(comfy.server.log_path.read_text(errors="replace"))
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    text = " ".join(entry["outputs"]["trainer"]["text"])
    assert "base weights fp8_e4m3fn" in text and "released after encoding: yes" in text
    pid = entry["prompt"][1]
    metrics = [m["data"]["metrics"] for m in comfy.messages_for(pid, "branchgrpo.metrics")]
    assert len(metrics) == 2 and all(m["loss"] is not None for m in metrics)  # finite (None = not finite)
    sd = load_file(str(comfy_base / "models" / "loras" / "branchgrpo" / "fp8_lora.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))

    # the stock loader puts the fp8-trained LoRA on the model as loaded (full precision): the Trainer's MODEL
    g2 = {k: graph[k] for k in ("unet", "clip", "latent")}
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": "branchgrpo/fp8_lora.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes("fp8_stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    trained, stock = (read_latent(comfy_base, t) for t in ("fp8_trained", "fp8_stock"))
    assert float((trained - stock).abs().max()) < 1e-5
    log = comfy.server.log_path.read_text(errors="replace")[log0:]
    assert "Traceback" not in log and "lora key not loaded" not in log
