"""The real-ComfyUI fixture works, and tiny random-weight models run through STOCK nodes.

Needs scripts/setup_dev.sh (skipped otherwise, see conftest.py).
"""
import re
import time

import pytest

from comfy_server import ComfyExecutionError, ComfyQueueError
import tiny_models as tm

# ComfyUI's own complaints when a state dict does not fit the model it built.
LOAD_COMPLAINTS = re.compile(r"unet missing|unet unexpected|Missing VAE keys|Leftover VAE keys|"
                             r"clip missing|clip unexpected")


@pytest.fixture(scope="module")
def tiny(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    # SD3-shaped conditioning ([1, 8, 4096] + pooled [1, 2048]) for the stock LoadTrainingDataset
    # node: runs the diffusion model without any text encoder.
    paths["cond_dataset"] = tm.write_conditioning_dataset(comfy_base / "output", "tiny_cond")
    return paths


@pytest.fixture(scope="module")
def clip_l(comfy_base):
    return tm.write_random_clip_l(comfy_base / "models")


def _log_since(comfy, offset):
    return comfy.server.log_path.read_text(errors="replace")[offset:]


def _log_size(comfy):
    return len(comfy.server.log_path.read_text(errors="replace"))


def test_server_starts_with_stock_nodes(comfy):
    stats = comfy.system_stats()
    assert stats["system"]["comfyui_version"] == "0.3.75"
    assert comfy.server.start_seconds < 120
    info = comfy.object_info()
    for node in ("UNETLoader", "KSampler", "VAELoader", "CLIPLoader", "ModelSamplingSD3",
                 "EmptySD3LatentImage", "SaveImage"):
        assert node in info, node
    assert comfy.websocket_connected
    # the pack is linked where ComfyUI looks for custom nodes
    link = comfy.server.base_dir / "custom_nodes" / "ComfyUI-BranchGRPO"
    assert link.is_symlink() and (link / "tests" / "comfy_server.py").exists()


def test_tiny_files_are_small_and_deterministic(tmp_path):
    a = tm.write_tiny_sd3(tmp_path / "a")
    b = tm.write_tiny_sd3(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    c = tm.write_tiny_sd3(tmp_path / "c", seed=1)
    assert a.read_bytes() != c.read_bytes()
    for p in tm.write_all_tiny(tmp_path / "all").values():
        assert p.stat().st_size < 8 * 2**20, p
    sd = tm.sd3_state_dict()
    assert all(bool(v.isfinite().all()) for v in sd.values())
    assert max(float(v.abs().max()) for v in sd.values()) < 10


def test_queue_error_carries_node_errors(comfy):
    graph = {"1": {"class_type": "UNETLoader",
                   "inputs": {"unet_name": "does_not_exist.safetensors", "weight_dtype": "default"}},
             "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
             "3": {"class_type": "KSampler", "inputs": {}}}
    with pytest.raises(ComfyQueueError) as err:
        comfy.queue(graph)
    assert err.value.status == 400
    assert err.value.body.get("error")


def _sd3_graph(unet, vae, positive, negative, steps=2, size=64, extra=None, save=True):
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ms", 0], "seed": 1, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": positive, "negative": negative,
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
    }
    if save:
        g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "tiny"}}
    g.update(extra or {})
    return g


def test_tiny_sd3_samples_without_text_encoder(comfy, tiny):
    """UNETLoader(tiny SD3) -> KSampler with conditioning from the stock LoadTrainingDataset
    -> VAEDecode(TAESD) -> SaveImage."""
    log0 = _log_size(comfy)
    graph = _sd3_graph(tiny["sd3"].name, tiny["taesd_vae"].name, ["data", 1], ["neg", 0], extra={
        "data": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": "tiny_cond"}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["data", 1]}},
    })
    t0 = time.monotonic()
    entry = comfy.run(graph, timeout=120)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1
    out = comfy.server.base_dir / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert out.is_file() and out.stat().st_size > 0
    pid = entry["prompt"][1]
    assert comfy.messages_for(pid, "progress"), "no progress message over the websocket"
    assert comfy.messages_for(pid, "execution_success")
    log = _log_since(comfy, log0)
    assert "model_type FLOW" in log
    assert not LOAD_COMPLAINTS.search(log), log[-3000:]
    assert time.monotonic() - t0 < 60


def test_tiny_sd3_with_random_clip_l(comfy, tiny, clip_l):
    """The full stock text-to-image path: CLIPLoader(type sd3) + CLIPTextEncode + tiny SD3 + TAESD."""
    log0 = _log_size(comfy)
    graph = _sd3_graph(tiny["sd3"].name, tiny["taesd_vae"].name, ["pos", 0], ["neg", 0], extra={
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_l.name, "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["clip", 0]}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
    })
    entry = comfy.run(graph, timeout=180)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"]["save"]["images"]) == 1
    log = _log_since(comfy, log0)
    assert not LOAD_COMPLAINTS.search(log), log[-3000:]


def test_tiny_wan21_video(comfy, tiny, clip_l):
    """UNETLoader(tiny Wan 2.1) + 5-frame latent video + VAEDecode(tiny Wan VAE)."""
    log0 = _log_size(comfy)
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny["wan21"].name, "weight_dtype": "default"}},
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 8.0}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_l.name, "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube spinning", "clip": ["clip", 0]}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ms", 0], "seed": 2, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": tiny["wan21_vae"].name}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    entry = comfy.run(graph, timeout=180)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"]["preview"]["images"]) == 5  # 2 latent frames -> 5 video frames
    log = _log_since(comfy, log0)
    assert "WAN21" in log or "model_type FLOW" in log
    assert not LOAD_COMPLAINTS.search(log), log[-3000:]


def test_interrupt_stops_a_running_prompt(comfy, tiny):
    graph = _sd3_graph(tiny["sd3"].name, tiny["taesd_vae"].name, ["data", 1], ["neg", 0],
                       steps=5000, save=False, extra={
                           "data": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": "tiny_cond"}},
                           "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["data", 1]}},
                           "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
                       })
    pid = comfy.queue(graph)
    comfy.wait_for_message(lambda m: m.get("type") == "progress"
                           and (m.get("data") or {}).get("prompt_id") == pid, timeout=60)
    comfy.interrupt()
    entry = comfy.wait(pid, timeout=60)
    assert entry["status"]["status_str"] == "error"
    assert comfy.messages_for(pid, "execution_interrupted")


def test_runtime_error_raises_with_traceback(comfy, comfy_base):
    from safetensors.torch import save_file
    import torch
    bad = comfy_base / "models" / "diffusion_models" / "not_a_model.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(bad))
    graph = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": bad.name, "weight_dtype": "default"}},
             "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
             "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "pos": {"class_type": "LotusConditioning", "inputs": {}},
             "ks": {"class_type": "KSampler", "inputs": {
                 "model": ["ms", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                 "scheduler": "simple", "positive": ["pos", 0], "negative": ["pos", 0],
                 "latent_image": ["latent", 0], "denoise": 1.0}},
             "out": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "x"}}}
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(graph, timeout=60)
    assert err.value.error_message and err.value.error_message["node_type"] == "UNETLoader"
    assert "Could not detect model type" in str(err.value)
