"""The Trainer node's everyday/expert split, its validation errors, resume checks and the protection of a
run against a Save LoRA file name that would be refused after training; in a real ComfyUI server with
tiny random-weight models (needs scripts/setup_dev.sh)."""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from browser_helpers import http_json
from comfy_server import ComfyExecutionError
from test_comfy_training import EXPERT_INPUTS, training_graph

pytestmark = pytest.mark.comfy
EVERYDAY = ["iterations", "prompts_per_iteration", "learning_rate", "lora_rank", "lora_alpha", "seed",
            "run_name", "resume", "algorithm", "continue_lora"]


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def _widgets(spec: dict) -> list[str]:
    """The inputs of an /object_info entry that the frontend shows as widgets (not sockets), in order."""
    sockets = {"MODEL", "CLIP", "VAE", "LATENT"}
    out = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind = spec["input"][section][name][0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append(name)
            else:
                assert kind in sockets or kind.startswith(("BRANCHGRPO_", "REWARD_")), kind
    return out


def test_trainer_shows_the_everyday_widgets_and_settings_hold_the_rest(comfy):
    info = comfy.object_info()
    trainer, settings = info["BranchGRPOTrainer"], info["BranchGRPOTrainerSettings"]
    assert _widgets(trainer) == EVERYDAY
    assert trainer["input"]["optional"]["settings"][0] == "BRANCHGRPO_TRAINER_SETTINGS"
    assert settings["output"] == ["BRANCHGRPO_TRAINER_SETTINGS"]
    assert set(EXPERT_INPUTS) <= set(_widgets(settings))  # (more expert options may follow in nodes/inputs.py)
    guidance = settings["input"]["optional"]["flux_guidance"][1]
    assert guidance["default"] == 3.5 and guidance["tooltip"].startswith("FLUX only")
    # the export node takes the same socket and no expert widget of its own
    export = info["BranchGRPOExportRunConfig"]
    assert export["input"]["optional"]["settings"][0] == "BRANCHGRPO_TRAINER_SETTINGS"
    assert not set(_widgets(export)) & (set(EXPERT_INPUTS) - {"lora_targets"})
    for name in ("iterations", "learning_rate", "lora_rank", "lora_alpha", "seed"):  # one definition
        assert export["input"]["optional"][name][1]["tooltip"] == trainer["input"]["required"][name][1]["tooltip"]


def _node_errors(comfy, graph) -> dict:
    status, body = http_json(comfy.url + "/prompt", {"prompt": graph, "client_id": comfy.client_id})
    if status == 200:  # queued: drop it
        comfy.post("/queue", {"delete": [body["prompt_id"]]})
        comfy.interrupt()
    return body.get("node_errors") or {}


def test_each_validation_error_is_reported_once(comfy, models):
    graph = training_graph(models, "once", split_steps="0,30", lora_file="../evil_lora")
    graph["trainer"]["inputs"]["run_name"] = "../x"
    errors = _node_errors(comfy, graph)
    sched = errors["schedule"]["errors"]
    assert len(sched) == 1 and "split_steps" in sched[0]["details"], sched
    save = errors["save"]["errors"]
    assert len(save) == 1 and save[0]["extra_info"]["input_name"] == "filename", save
    assert "escapes the loras folder" in save[0]["details"]
    run = errors["trainer"]["errors"]
    assert len(run) == 1 and run[0]["extra_info"]["input_name"] == "run_name", run


def test_bad_save_lora_name_stops_before_training(comfy, comfy_base, models):
    """ComfyUI queues the graph (the Metrics Plot output validated) but the Trainer refuses to start."""
    graph = training_graph(models, "evil_name", iterations=50, lora_file="../evil_lora")
    status, body = http_json(comfy.url + "/prompt", {"prompt": graph, "client_id": comfy.client_id})
    assert status == 200 and "save" in body["node_errors"], body
    entry = comfy.wait(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "error"
    err = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert err["node_id"] == "trainer", err
    assert "not started" in err["exception_message"] and "escapes the loras folder" in err["exception_message"]
    assert not comfy.messages_for(body["prompt_id"], "branchgrpo.metrics")
    assert not (comfy_base / "output" / "branchgrpo" / "evil_name").exists()


def test_resume_checks_name_differences_refuse_fewer_iterations_and_save_at_once(comfy, comfy_base, models):
    ck = comfy_base / "output" / "branchgrpo" / "resumed" / "checkpoint.pt"
    entry = comfy.run(training_graph(models, "resumed", iterations=2, resume=True), timeout=600)
    assert entry["status"]["status_str"] == "success"
    assert int(torch.load(ck, weights_only=True)["iteration"]) == 2

    # fewer iterations than done: refused, the checkpoint untouched
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(training_graph(models, "resumed", iterations=1, resume=True), timeout=300)
    msg = err.value.error_message["exception_message"]
    assert "already completed 2 iterations" in msg and "iterations = 1" in msg, msg
    assert int(torch.load(ck, weights_only=True)["iteration"]) == 2

    # other settings: each difference named with both values
    graph = training_graph(models, "resumed", iterations=3, resume=True, split_steps="0,3")
    graph["trainer_settings"]["inputs"]["clip_range"] = 0.01
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(graph, timeout=300)
    msg = err.value.error_message["exception_message"]
    assert "schedule.split_steps (Branch Schedule): checkpoint [0, 2], now [0, 3]" in msg, msg
    assert "optim.clip_range (Trainer / Trainer Settings): checkpoint 0.001, now 0.01" in msg, msg

    # the same settings and iterations: loads the checkpoint and returns its LoRA without training
    entry = comfy.run(training_graph(models, "resumed", iterations=2, resume=True,
                                     lora_file="branchgrpo/resumed_again"), timeout=300)
    assert "2/2 iterations (resumed from 2)" in " ".join(entry["outputs"]["trainer"]["text"])
    assert not comfy.messages_for(entry["prompt"][1], "branchgrpo.metrics")
    assert (comfy_base / "models" / "loras" / "branchgrpo" / "resumed_again.safetensors").is_file()


def test_tree_view_draws_the_sampler_tree_with_leaf_rewards(comfy, models):
    graph = training_graph(models, "unused")
    graph = {k: graph[k] for k in ("unet", "clip", "vae", "latent", "reward", "schedule")}
    graph.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["clip", 0]}},
        "ts": {"class_type": "BranchGRPOTreeSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "latent": ["latent", 0], "seed": 1,
            "schedule": ["schedule", 0], "max_batch": 16}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ts", 0], "vae": ["vae", 0]}},
        "view": {"class_type": "BranchGRPOTreeView", "inputs": {
            "tree": ["ts", 1], "leaf_images": ["dec", 0], "reward": ["reward", 0], "prompt": "a red cube",
            "width": 512, "height": 384}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["view", 0]}},
    })
    # Flow-GRPO's SDE: 'auto' fork noise is quiet, an explicit 4.0 gets a warning on the node
    flow = {"sde": "flowgrpo", "eta": 0.7}
    graph["schedule"]["inputs"].update(flow, split_noise_scale=0.0)
    graph["noisy"] = {"class_type": "BranchGRPOBranchSchedule",
                      "inputs": {**graph["schedule"]["inputs"], "split_noise_scale": 4.0}}
    graph["ts2"] = {**graph["ts"], "inputs": {**graph["ts"]["inputs"], "schedule": ["noisy", 0]}}
    graph["out2"] = {"class_type": "PreviewAny", "inputs": {"source": ["ts2", 0]}}
    entry = comfy.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "success"
    auto, noisy = (" ".join(entry["outputs"][k]["text"]) for k in ("schedule", "noisy"))
    assert "fork noise scale 1 (auto)" in auto and "WARNING" not in auto, auto
    assert "WARNING: split_noise_scale 4 with the flowgrpo SDE" in noisy, noisy
    text = " ".join(entry["outputs"]["view"]["text"])
    assert text.startswith("4 leaves; rewards "), text  # 6 steps forking at 0 and 2, K = 2
    lo, hi = (float(v) for v in text.split("rewards ")[1].split(" .. "))
    assert hi > lo
    assert entry["outputs"]["out"]["images"]
