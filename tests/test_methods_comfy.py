"""The Method node in a real ComfyUI: a forward-process method chosen in the graph trains, its LoRA
loads with the stock loader and reproduces the trained model, and Export Run Config writes it as the
run config's [objective]. Tiny random-weight models; needs scripts/setup_dev.sh."""
from __future__ import annotations

import pytest

from test_comfy_training import models, predict_nodes, read_latent, training_graph  # noqa: F401 (fixture)

pytestmark = pytest.mark.comfy


def test_method_node_lists_every_method_with_tooltips(comfy):
    info = comfy.object_info()["BranchGRPOMethod"]
    assert info["description"]
    spec = info["input"]["required"]["method"]
    assert spec[0] == ["ppo", "diffusionnft", "awm", "dgpo"] or spec[1].get("options") == [
        "ppo", "diffusionnft", "awm", "dgpo"]
    assert "method" in info["output"][0].lower() or info["output"] == ["BRANCHGRPO_METHOD"]
    assert "method" in comfy.object_info()["BranchGRPOTrainer"]["input"]["optional"]


def test_a_forward_process_method_trains_two_iterations_and_its_lora_loads_in_the_stock_loader(
        comfy, comfy_base, models):  # noqa: F811
    graph = training_graph(models, "method_nft", lora_file="branchgrpo/method_nft",
                           extra={**predict_nodes("nft_trained", ["trainer", 0]),
                                  **predict_nodes("nft_base", ["unet", 0])})
    graph["method"] = {"class_type": "BranchGRPOMethod",
                       "inputs": {"method": "diffusionnft", "train_timesteps": 2, "kl_beta": 0.0}}
    graph["trainer"]["inputs"]["method"] = ["method", 0]
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    metrics = [m["data"] for m in comfy.messages_for(entry["prompt"][1], "branchgrpo.metrics")]
    assert [m["iteration"] for m in metrics] == [1, 2]
    last = metrics[-1]["metrics"]
    assert last["train_timesteps"] == 2 and last["optimizer_steps"] == 1
    assert last["edges_trained"] == 2 * 4  # 4 leaves, each re-noised at 2 timesteps
    lora = comfy_base / "models" / "loras" / "branchgrpo" / "method_nft.safetensors"
    assert lora.is_file()
    log1 = len(comfy.server.log_path.read_text(errors="replace"))
    g2 = {k: graph[k] for k in ("unet", "clip", "latent")}
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": "branchgrpo/method_nft.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes("nft_stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    assert "lora key not loaded" not in comfy.server.log_path.read_text(errors="replace")[log1:]
    trained, stock, base = (read_latent(comfy_base, t) for t in ("nft_trained", "nft_stock", "nft_base"))
    assert float((trained - stock).abs().max()) < 1e-5
    assert float((trained - base).abs().max()) > 1e-4
