"""BranchGRPO training through a real ComfyUI server on other flow-model families than SD3:

- FLUX (tiny, from the pack's ``BranchGRPOTinyFlowModelLoader``: the stock UNETLoader cannot build a
  small FLUX), conditioned through the stock CLIPLoader(random CLIP-L, type "sd3");
- Wan 2.1 text-to-video (tiny, stock UNETLoader; 5-frame latent video; tiny Wan VAE), whose decoded
  leaves are videos [N, T, H, W, 3];
- gradient checkpointing on vs off gives the same LoRA.

Each trained MODEL's KSampler prediction must equal the base model + stock LoraLoaderModelOnly with
the exported file, with every exported key consumed. Needs scripts/setup_dev.sh.
"""
from __future__ import annotations

import re
import shutil

import pytest
from safetensors.torch import load_file

import tiny_models as tm
from test_comfy_training import split_settings

pytestmark = pytest.mark.comfy

LORA_KEY = re.compile(r"^diffusion_model\..+\.(lora_up\.weight|lora_down\.weight|alpha)$")


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def _log_size(comfy) -> int:
    return len(comfy.server.log_path.read_text(errors="replace"))


def _log_since(comfy, offset: int) -> str:
    return comfy.server.log_path.read_text(errors="replace")[offset:]


def flux_loader(seed=0, weights=None):
    inputs = {"family": "flux", "seed": seed}
    if weights:
        inputs["weights"] = weights
    return {"class_type": "BranchGRPOTinyFlowModelLoader", "inputs": inputs}


def family_nodes(models, family):
    """Model, text encoder, VAE and empty latent of one family (node ids: unet, clip, vae, latent)."""
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": models["clip_l"].name, "type": "sd3"}}
    if family == "flux":
        return {
            "unet": flux_loader(seed=0), "clip": clip,
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models["taesd_vae"].name}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        }
    if family == "wan21":
        return {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": models["wan21"].name,
                                                            "weight_dtype": "default"}},
            "clip": clip,
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models["wan21_vae"].name}},
            "latent": {"class_type": "EmptyHunyuanLatentVideo",
                       "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}},
        }
    raise ValueError(family)


def training_graph(models, family, run_name, lora_file, *, iterations=2, steps=4, checkpointing="off",
                   extra=None):
    g = family_nodes(models, family)
    g.update({
        "prompts": {"class_type": "BranchGRPOPrompts", "inputs": {
            "prompts": "a red cube\na blue ball", "file": "", "eval_count": 0}},
        "reward": {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": "brightness"}},
        "schedule": {"class_type": "BranchGRPOBranchSchedule", "inputs": {
            "steps": steps, "split_steps": "0,2", "branching": "2", "split_noise_scale": 4.0,
            "sde": "dancegrpo", "eta": 0.3, "shift": 3.0, "group_size": 1, "sde_window_size": 0,
            "sde_window_start": 0}},
        "trainer": {"class_type": "BranchGRPOTrainer", "inputs": {
            "model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0], "prompts": ["prompts", 0],
            "reward": ["reward", 0], "latent": ["latent", 0], "iterations": iterations, "prompts_per_iteration": 1,
            "learning_rate": 2e-2, "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": "*", "seed": 3,
            "schedule": ["schedule", 0], "run_name": run_name, "resume": False, "max_train_batch": 8,
            "gradient_checkpointing": checkpointing}},
        "save": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["trainer", 1], "filename": lora_file,
                                                               "overwrite": True}},
    })
    g.update(extra or {})
    return split_settings(g)


def predict_nodes(tag, model_ref):
    """KSampler (2 Euler steps, fixed seed, cfg 1) on ``model_ref`` -> SaveLatent ``cmp_fam/<tag>``."""
    return {
        f"pos_{tag}": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["clip", 0]}},
        f"ks_{tag}": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [f"pos_{tag}", 0], "negative": [f"pos_{tag}", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        f"sl_{tag}": {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{tag}", 0],
                                                             "filename_prefix": f"cmp_fam/{tag}"}},
    }


def read_latent(comfy_base, tag):
    files = sorted((comfy_base / "output" / "cmp_fam").glob(f"{tag}_*.latent"))
    assert files, f"no latent saved for {tag}"
    return load_file(str(files[-1]))["latent_tensor"]


def metrics_of(comfy, run_name):
    return [m["data"] for m in comfy.messages if m.get("type") == "branchgrpo.metrics"
            and m["data"].get("run") == run_name]


def lora_path(comfy_base, name):
    return comfy_base / "models" / "loras" / "branchgrpo" / f"{name}.safetensors"


def train_and_compare_with_stock_loader(comfy, comfy_base, models, family, *, tag, iterations=2,
                                        checkpointing="off"):
    """Train, save the LoRA, and check trained MODEL == base + stock LoraLoaderModelOnly(file) != base."""
    log0 = _log_size(comfy)
    graph = training_graph(models, family, f"fam_{tag}", f"branchgrpo/fam_{tag}", iterations=iterations,
                           checkpointing=checkpointing,
                           extra={**predict_nodes(f"{tag}_trained", ["trainer", 0]),
                                  **predict_nodes(f"{tag}_base", ["unet", 0])})
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    metrics = metrics_of(comfy, f"fam_{tag}")
    assert [m["iteration"] for m in metrics] == list(range(1, iterations + 1))
    assert {"reward_mean", "reward_max", "reward_min", "loss"} <= set(metrics[-1]["metrics"])
    assert all(m["metrics"]["reward_mean"] is not None for m in metrics)
    assert metrics[-1]["tree"]["widths"] == [1, 2, 2, 4, 4]
    path = lora_path(comfy_base, f"fam_{tag}")
    sd = load_file(str(path))
    assert sd and all(LORA_KEY.match(k) for k in sd), sorted(sd)[:5]
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    train_log = _log_since(comfy, log0)
    assert f"gradient checkpointing {checkpointing}" in train_log
    assert "Traceback" not in train_log

    # a second graph: the same base model + the stock LoRA loader with the exported file
    log1 = _log_size(comfy)
    g2 = family_nodes(models, family)
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": f"branchgrpo/fam_{tag}.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes(f"{tag}_stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    assert "lora key not loaded" not in _log_since(comfy, log1), "an exported key was not consumed by ComfyUI"
    trained, stock, base = (read_latent(comfy_base, f"{tag}_{t}") for t in ("trained", "stock", "base"))
    assert trained.shape == base.shape
    assert float((trained - stock).abs().max()) < 1e-5
    assert float((trained - base).abs().max()) > 1e-3
    return sd, entry


def test_tiny_flux_loader_is_listed_as_experimental_test_node(comfy):
    info = comfy.object_info("BranchGRPOTinyFlowModelLoader")["BranchGRPOTinyFlowModelLoader"]
    assert info["display_name"] == "Tiny Random Flow Model (tests/demo)"
    assert info["category"] == "BranchGRPO/testing"
    assert info.get("experimental") is True
    assert "random" in info["description"].lower() and "test" in info["description"].lower()
    specs = {**info["input"]["required"], **(info["input"].get("optional") or {})}
    assert {"family", "seed", "weights"} <= set(specs)
    assert all(spec[1].get("tooltip") for spec in specs.values())
    family = specs["family"]
    assert "flux" in (family[0] if isinstance(family[0], list) else family[1].get("options", []))


def test_flux_trains_and_lora_matches_stock_loader(comfy, comfy_base, models):
    train_and_compare_with_stock_loader(comfy, comfy_base, models, "flux", tag="flux")


def test_gradient_checkpointing_gives_the_same_lora(comfy, comfy_base, models):
    off = lora_path(comfy_base, "fam_flux")
    if not off.is_file():  # run alone: make the 'off' LoRA first
        train_and_compare_with_stock_loader(comfy, comfy_base, models, "flux", tag="flux")
    sd_on, _ = train_and_compare_with_stock_loader(comfy, comfy_base, models, "flux", tag="flux_gc",
                                                   checkpointing="on")
    sd_off = load_file(str(off))
    assert set(sd_on) == set(sd_off)
    diff = max(float((sd_on[k] - sd_off[k]).abs().max()) for k in sd_on)
    scale = max(float(v.abs().max()) for k, v in sd_off.items() if k.endswith("lora_up.weight"))
    # The gradients agree to float rounding (tests/test_checkpointing_grads.py); AdamW turns rounding on
    # near-zero gradient elements into steps of up to the learning rate, so the LoRAs agree to ~1 % here.
    assert scale > 1e-3 and diff < 2e-2 * scale, (diff, scale)


def test_wan21_video_trains_and_lora_matches_stock_loader(comfy, comfy_base, models):
    _, entry = train_and_compare_with_stock_loader(comfy, comfy_base, models, "wan21", tag="wan21", iterations=1)
    base = read_latent(comfy_base, "wan21_base")
    assert base.dim() == 5 and base.shape[2] == 2  # [B, C, T, H, W]: 5 frames -> 2 latent frames


def test_tiny_flux_weights_file_overrides_the_seed(comfy, comfy_base, models):
    """ModelSave of the seed-1 model -> models/diffusion_models -> the loader with seed 0 + that file
    predicts exactly as the seed-1 model (a LoRA trained on a saved tiny model is reproducible)."""
    g = family_nodes(models, "flux")
    g["unet"] = flux_loader(seed=1)
    g["msave"] = {"class_type": "ModelSave", "inputs": {"model": ["unet", 0],
                                                       "filename_prefix": "tiny_flux_export/tiny_flux_seed1"}}
    g.update(predict_nodes("seed1", ["unet", 0]))
    assert comfy.run(g, timeout=300)["status"]["status_str"] == "success"
    saved = sorted((comfy_base / "output" / "tiny_flux_export").glob("tiny_flux_seed1*.safetensors"))
    assert saved
    dst = comfy_base / "models" / "diffusion_models" / "tiny_flux_seed1.safetensors"
    shutil.copyfile(saved[-1], dst)

    g2 = family_nodes(models, "flux")
    g2["unet"] = flux_loader(seed=0, weights=dst.name)
    g2["seed0"] = flux_loader(seed=0)
    g2.update(predict_nodes("from_file", ["unet", 0]))
    g2.update(predict_nodes("seed0", ["seed0", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    seed1, from_file, seed0 = (read_latent(comfy_base, t) for t in ("seed1", "from_file", "seed0"))
    assert float((seed1 - from_file).abs().max()) < 1e-6
    assert float((seed1 - seed0).abs().max()) > 1e-3
