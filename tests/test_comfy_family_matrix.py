"""Every flow (CONST-sampling) family of ComfyUI 0.3.75 trains in the real ComfyUI.

For each family a tiny random-weight model (one block per block list) runs two Trainer iterations (2 steps,
one split into 2 leaves). The stock ``LoraLoaderModelOnly`` with the saved file then reproduces the trained
MODEL's KSampler prediction, every key of the file is consumed ("lora key not loaded" never logged), and the
file's ``branchgrpo.base_model`` names the ComfyUI model class the family loads as.

How each tiny model is made:

* ``file`` families load through the stock ``UNETLoader``, i.e. ComfyUI's own model detection: SD3 and Wan 2.1
  from ``tests/tiny_models.py``; Wan 2.2, HunyuanVideo, HunyuanVideo 1.5 and HunyuanImage 2.1 from a tiny model
  of the dev node *Tiny Random Model of a Family* saved with the stock ``ModelSave`` (their detection reads every
  size from the weights).
* ``dev`` families are built by that node from ComfyUI's own config class and a tiny ``unet_config``: their
  detection hard-codes full-size widths or head counts (FLUX.1/2, Chroma, Qwen-Image, Mochi, LTX-Video,
  Lumina 2, Z-Image, AuraFlow).

Text conditioning comes from the dev *Tiny Random Text Encoder* at the width the tiny model reads (real
encoders are fixed-size), the VAE from the stock loader where a tiny one exists, else the dev *Tiny Random VAE*.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_models as tm
from comfy_server import ComfyExecutionError
from test_comfy_training import split_settings

pytestmark = pytest.mark.comfy

LORA_KEY = re.compile(r"^diffusion_model\..+\.(lora_up\.weight|lora_down\.weight|alpha)$")
SAVED = ("wan22", "hunyuan_video", "hunyuan_video15", "hunyuan_image21")  # dev model -> ModelSave -> UNETLoader


@dataclass
class Family:
    name: str
    model_class: str  # comfy.model_base class the family loads as
    source: str  # "file:<diffusion_models file>" (stock UNETLoader) or "dev:<family>" (dev node)
    text: tuple  # (width, tokens, pooled_width, attention_mask[, llama3_layers]) of the tiny text encoder
    vae: tuple  # ("tiny", channels), ("stock", <tiny_models file key>) or ("stock", <VAELoader name>)
    latent: dict = field(default_factory=dict)


def _empty(node, **inputs):
    return {"class_type": node, "inputs": {"batch_size": 1, **inputs}}


SD3_LATENT = _empty("EmptySD3LatentImage", width=64, height=64)
VIDEO16 = _empty("EmptyHunyuanLatentVideo", width=64, height=64, length=5)

FAMILIES = [
    Family("sd3", "SD3", "file:tiny_sd3.safetensors", (4096, 8, 2048, False), ("stock", "taesd_vae"), SD3_LATENT),
    Family("wan21", "WAN21", "file:tiny_wan21.safetensors", (4096, 8, 0, False), ("stock", "wan21_vae"), VIDEO16),
    Family("wan22", "WAN22", "file:tiny_wan22.safetensors", (4096, 8, 0, False), ("tiny", 48),
           {"class_type": "Wan22ImageToVideoLatent",
            "inputs": {"vae": ["vae", 0], "width": 64, "height": 64, "length": 5, "batch_size": 1}}),
    Family("hunyuan_video", "HunyuanVideo", "file:tiny_hunyuan_video.safetensors", (32, 8, 768, False),
           ("tiny", 16), VIDEO16),
    Family("hunyuan_video15", "HunyuanVideo15", "file:tiny_hunyuan_video15.safetensors", (32, 8, 0, False),
           ("tiny", 32), _empty("EmptyHunyuanVideo15Latent", width=64, height=64, length=5)),
    Family("hunyuan_image21", "HunyuanImage21", "file:tiny_hunyuan_image21.safetensors", (32, 8, 0, False),
           ("tiny", 64), _empty("EmptyHunyuanImageLatent", width=128, height=128)),
    Family("flux", "Flux", "dev:flux", (32, 8, 32, False), ("stock", "taesd_vae"), SD3_LATENT),
    Family("flux_schnell", "Flux", "dev:flux_schnell", (32, 8, 32, False), ("stock", "taesd_vae"), SD3_LATENT),
    Family("flux2", "Flux2", "dev:flux2", (32, 8, 0, False), ("tiny", 128),
           _empty("EmptyFlux2LatentImage", width=64, height=64)),
    Family("chroma", "Chroma", "dev:chroma", (32, 8, 0, False), ("stock", "taesd_vae"), SD3_LATENT),
    # Qwen-Image's latent is a one-frame video [B, 16, 1, H, W]; users wire an Empty SD3 Latent, and the
    # Trainer adds the frame axis as the KSampler does.
    Family("qwen_image", "QwenImage", "dev:qwen_image", (32, 8, 0, False), ("tiny", 16), SD3_LATENT),
    Family("mochi", "GenmoMochi", "dev:mochi", (32, 8, 0, True), ("tiny", 12),
           _empty("EmptyMochiLatentVideo", width=64, height=64, length=7)),
    Family("ltxv", "LTXV", "dev:ltxv", (32, 8, 0, True), ("tiny", 128),
           _empty("EmptyLTXVLatentVideo", width=64, height=64, length=9)),
    Family("lumina2", "Lumina2", "dev:lumina2", (32, 8, 0, True), ("stock", "taesd_vae"), SD3_LATENT),
    Family("z_image", "Lumina2", "dev:z_image", (32, 8, 0, True), ("stock", "taesd_vae"), SD3_LATENT),
    Family("auraflow", "AuraFlow", "dev:auraflow", (2048, 8, 0, False), ("tiny", 4),
           _empty("EmptyLatentImage", width=64, height=64)),
    Family("chroma_radiance", "ChromaRadiance", "dev:chroma_radiance", (32, 8, 0, False), ("stock", "pixel_space"),
           _empty("EmptyChromaRadianceLatentImage", width=32, height=32)),
    Family("omnigen2", "Omnigen2", "dev:omnigen2", (32, 8, 0, True), ("stock", "taesd_vae"), SD3_LATENT),
    Family("hidream", "HiDream", "dev:hidream", (32, 8, 32, False, 2), ("stock", "taesd_vae"), SD3_LATENT),
]
BY_NAME = {f.name: f for f in FAMILIES}


def _log_size(comfy) -> int:
    return len(comfy.server.log_path.read_text(errors="replace"))


def _log_since(comfy, offset: int) -> str:
    return comfy.server.log_path.read_text(errors="replace")[offset:]


@pytest.fixture(scope="module")
def family_models(comfy, comfy_base):
    """The tiny model files: SD3 / Wan 2.1 / VAEs from tiny_models, and the detectable dev families saved
    by the stock ModelSave into models/diffusion_models."""
    paths = tm.write_all_tiny(comfy_base / "models")
    graph = {}
    for name in SAVED:
        graph[f"m_{name}"] = {"class_type": "BranchGRPOTinyFamilyModel", "inputs": {"family": name, "seed": 0}}
        graph[f"s_{name}"] = {"class_type": "ModelSave", "inputs": {"model": [f"m_{name}", 0],
                                                                    "filename_prefix": f"tiny_family/{name}"}}
    comfy.run(graph, timeout=300)
    for name in SAVED:
        saved = sorted((comfy_base / "output" / "tiny_family").glob(f"{name}_0*.safetensors"))
        assert saved, f"ModelSave wrote no file for {name}"
        dst = comfy_base / "models" / "diffusion_models" / f"tiny_{name}.safetensors"
        shutil.copyfile(saved[-1], dst)
        paths[name] = dst
    return paths


def family_nodes(models, fam: Family) -> dict:
    """Model, text encoder, VAE and empty latent of one family (node ids unet, clip, vae, latent)."""
    kind, what = fam.source.split(":", 1)
    if kind == "file":
        unet = {"class_type": "UNETLoader", "inputs": {"unet_name": what, "weight_dtype": "default"}}
    else:
        unet = {"class_type": "BranchGRPOTinyFamilyModel", "inputs": {"family": what, "seed": 0}}
    width, tokens, pooled, mask, *llama = fam.text
    clip = {"class_type": "BranchGRPOTinyTextEncoder", "inputs": {
        "width": width, "tokens": tokens, "pooled_width": pooled, "attention_mask": mask, "seed": 0,
        "llama3_layers": llama[0] if llama else 0}}
    if fam.vae[0] == "stock":
        name = models[fam.vae[1]].name if fam.vae[1] in models else fam.vae[1]
        vae = {"class_type": "VAELoader", "inputs": {"vae_name": name}}
    else:
        vae = {"class_type": "BranchGRPOTinyVAE", "inputs": {"channels": fam.vae[1], "downscale": 8, "seed": 0}}
    return {"unet": unet, "clip": clip, "vae": vae, "latent": fam.latent}


def predict_nodes(tag, model_ref):
    """KSampler (2 Euler steps, fixed seed, cfg 1) on ``model_ref`` -> SaveLatent ``cmp_matrix/<tag>``."""
    return {
        f"pos_{tag}": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["clip", 0]}},
        f"ks_{tag}": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [f"pos_{tag}", 0], "negative": [f"pos_{tag}", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        f"sl_{tag}": {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{tag}", 0],
                                                             "filename_prefix": f"cmp_matrix/{tag}"}},
    }


def read_latent(comfy_base, tag):
    files = sorted((comfy_base / "output" / "cmp_matrix").glob(f"{tag}_[0-9][0-9][0-9][0-9][0-9]_.latent"))
    assert files, f"no latent saved for {tag}"
    return load_file(str(files[-1]))["latent_tensor"]


def training_graph(models, fam: Family, run_name: str, lora_file: str, extra=None, checkpointing="off") -> dict:
    g = family_nodes(models, fam)
    g.update({
        "prompts": {"class_type": "BranchGRPOPrompts", "inputs": {
            "prompts": "a red cube\na blue ball", "file": "", "eval_count": 0}},
        "reward": {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": "brightness"}},
        "schedule": {"class_type": "BranchGRPOBranchSchedule", "inputs": {
            "steps": 2, "split_steps": "0", "branching": "2", "split_noise_scale": 4.0,
            "sde": "dancegrpo", "eta": 0.3, "shift": 3.0, "group_size": 1, "sde_window_size": 0,
            "sde_window_start": 0}},
        "trainer": {"class_type": "BranchGRPOTrainer", "inputs": {
            "model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0], "prompts": ["prompts", 0],
            "reward": ["reward", 0], "latent": ["latent", 0], "iterations": 2, "prompts_per_iteration": 1,
            "learning_rate": 5e-2, "lora_rank": 2, "lora_alpha": 2.0, "lora_targets": "*", "seed": 3,
            "schedule": ["schedule", 0], "run_name": run_name, "resume": False, "max_train_batch": 8,
            "gradient_checkpointing": checkpointing}},
        "save": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["trainer", 1], "filename": lora_file,
                                                               "overwrite": True}},
    })
    g.update(extra or {})
    return split_settings(g)


#: the families users train most (ComfyUI's templates and the research code): the Trainer's memory prediction must
#: be available for each, so the budget check guards their runs
MOST_USED = {"flux", "flux_schnell", "flux2", "sd3", "wan21", "wan22", "qwen_image", "hunyuan_video", "ltxv",
             "chroma"}


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_trains_and_stock_lora_loader_reproduces_it(comfy, comfy_base, family_models, name,
                                                           record_property):
    fam = BY_NAME[name]
    run, lora_name = f"matrix_{name}", f"branchgrpo/matrix_{name}"
    log0 = _log_size(comfy)
    graph = training_graph(family_models, fam, run, lora_name,
                           extra={**predict_nodes(f"{name}_trained", ["trainer", 0]),
                                  **predict_nodes(f"{name}_base", ["unet", 0])})
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    metrics = [m["data"] for m in comfy.messages if m.get("type") == "branchgrpo.metrics"
               and m["data"].get("run") == run]
    assert [m["iteration"] for m in metrics][-2:] == [1, 2]
    assert all(m["metrics"]["reward_mean"] is not None for m in metrics)
    assert metrics[-1]["tree"]["widths"] == [1, 2, 2]
    assert "Traceback" not in _log_since(comfy, log0)
    # the memory prediction: available (the budget is checked), or said on the node
    text = " ".join(str(t) for t in (entry["outputs"].get("trainer") or {}).get("text", []))
    available = "predicted memory: peak" in text
    record_property("memory_prediction", "available" if available else "unavailable")
    print(f"{name}: memory prediction {'available' if available else 'unavailable'}"
          + ("" if available else f" ({text.split('unavailable for this', 1)[-1].split('), so', 1)[0]})"))
    assert available or "the memory prediction is unavailable" in text, text[-1500:]
    if name in MOST_USED:
        assert available, f"{name}: the memory prediction is unavailable: {text[-1500:]}"

    path = comfy_base / "models" / "loras" / f"{lora_name}.safetensors"
    sd = load_file(str(path))
    assert sd and all(LORA_KEY.match(k) for k in sd), sorted(sd)[:5]
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    assert meta.get("branchgrpo.base_model") == fam.model_class  # what ComfyUI loaded the tiny model as

    # the same base model + the stock LoRA loader with the saved file
    log1 = _log_size(comfy)
    g2 = family_nodes(family_models, fam)
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": f"{lora_name}.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes(f"{name}_stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    assert "lora key not loaded" not in _log_since(comfy, log1), "a saved key was not consumed by ComfyUI"
    trained, stock, base = (read_latent(comfy_base, f"{name}_{t}") for t in ("trained", "stock", "base"))
    assert trained.shape == base.shape
    assert float((trained - stock).abs().max()) < 1e-5
    assert float((trained - base).abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["ltxv", "flux"])
def test_in_place_block_updates_train_the_same_with_gradient_checkpointing(comfy, comfy_base, family_models, name):
    """Blocks that update their inputs in place after saving them for backward (LTX-Video: ``x.addcmul_``;
    FLUX: ``img += ...``) give the same LoRA with and without gradient checkpointing."""
    fam = BY_NAME[name]
    loras = {}
    for mode in ("off", "on"):
        run = f"matrix_{name}_gc_{mode}"
        assert comfy.run(training_graph(family_models, fam, run, f"branchgrpo/{run}", checkpointing=mode),
                         timeout=600)["status"]["status_str"] == "success"
        loras[mode] = load_file(str(comfy_base / "models" / "loras" / "branchgrpo" / f"{run}.safetensors"))
    assert set(loras["on"]) == set(loras["off"])
    # AdamW moves every element by about the learning rate per step whatever its gradient's size (the step is
    # m / sqrt(v)), and the up matrices start at zero, so their largest entry is the size of the training's
    # movement. Recomputing a block changes its gradients only by float rounding, which AdamW passes on as a
    # relative change of the movement (an element whose gradient is near 0 can move a little differently), while
    # a block that reads an input its own in-place update overwrote gives gradients, and so a movement, that
    # differ at their own scale. 1 % of the movement separates the two: rounding gave 4.3e-5 of it here (1.8e-4 on a
    # busy machine), a block whose saved input is not copied (LTX-Video) gave 1.0.
    movement = max(float(v.abs().max()) for k, v in loras["off"].items() if k.endswith("lora_up.weight"))
    assert movement > 0
    diff = max(float((loras["on"][k] - loras["off"][k]).abs().max()) for k in loras["on"])
    print(f"{name}: checkpointing on vs off: max difference {diff:.3g}, movement {movement:.3g}, "
          f"ratio {diff / movement:.3g}")
    assert diff <= 1e-2 * movement


def test_3d_shape_family_is_refused_with_its_name_and_reason(comfy, comfy_base, family_models):
    """Hunyuan3D 2 samples as a flow model, but its latent is a 3D shape that no reward scores: the Trainer
    refuses it by name before any work, and writes nothing."""
    fam = Family("hunyuan3d2", "Hunyuan3Dv2", "dev:hunyuan3d2", (32, 8, 0, False), ("tiny", 64),
                 _empty("EmptyLatentHunyuan3Dv2", resolution=16))
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(training_graph(family_models, fam, "matrix_refused_3d", "branchgrpo/matrix_refused_3d"),
                  timeout=300)
    text = str(err.value)
    assert "BranchGRPO Trainer: model" in text and "Hunyuan3Dv2 cannot be trained" in text, text[-1500:]
    assert "3D shapes" in text and "Model families" in text, text[-1500:]
    assert not (comfy_base / "models" / "loras" / "branchgrpo" / "matrix_refused_3d.safetensors").exists()
    assert not (comfy_base / "output" / "branchgrpo" / "matrix_refused_3d").exists()


# --------------------------------------------------------------------------- image-conditioned (edit) models
EDIT = {  # family -> (Family, whether the VAE encodes one-frame video latents)
    "kontext": (Family("kontext", "Flux", "dev:flux", (32, 8, 32, False), ("tiny", 16), SD3_LATENT), False),
    "qwen_image_edit": (Family("qwen_image_edit", "QwenImage", "dev:qwen_image", (32, 8, 0, False), ("tiny", 16),
                               _empty("EmptyHunyuanLatentVideo", width=64, height=64, length=1)), True),
}
INSTRUCTIONS = "make it red\nmake it blue"


def edit_nodes(models, fam: Family, video: bool) -> dict:
    g = family_nodes(models, fam)
    g["vae"]["inputs"]["video"] = video
    g["img_a"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": 0x2040C0}}
    g["img_b"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": 0xC08020}}
    g["images"] = {"class_type": "ImageBatch", "inputs": {"image1": ["img_a", 0], "image2": ["img_b", 0]}}
    g["edit"] = {"class_type": "BranchGRPOEditPrompts", "inputs": {
        "clip": ["clip", 0], "vae": ["vae", 0], "images": ["images", 0], "instructions": INSTRUCTIONS}}
    return g


def stock_reference_predict(tag, model_ref):
    """CLIPTextEncode(plain CLIP) -> stock ReferenceLatent(VAEEncode(first image)) -> KSampler -> SaveLatent."""
    nodes = predict_nodes(tag, model_ref)
    nodes[f"pos_{tag}"]["inputs"]["text"] = "make it red"
    nodes[f"enc_{tag}"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["img_a", 0], "vae": ["vae", 0]}}
    nodes[f"ref_{tag}"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [f"pos_{tag}", 0],
                                                                       "latent": [f"enc_{tag}", 0]}}
    for k in ("positive", "negative"):
        nodes[f"ks_{tag}"]["inputs"][k] = [f"ref_{tag}", 0]
    return nodes


@pytest.mark.parametrize("name", list(EDIT))
def test_edit_model_trains_with_reference_images(comfy, comfy_base, family_models, name):
    """(image, instruction) pairs: the Trainer's conditioning carries each instruction's reference latent
    exactly as the stock ReferenceLatent node adds it; the trained model is reproduced by the stock LoRA
    loader under stock reference conditioning; the reference changes the prediction and the training."""
    fam, video = EDIT[name]
    run, lora_name = f"edit_{name}", f"branchgrpo/edit_{name}"
    g = training_graph(family_models, fam, run, lora_name)
    g.update({k: v for k, v in edit_nodes(family_models, fam, video).items() if k not in g})
    g["vae"]["inputs"]["video"] = video
    g["trainer"]["inputs"].update({"clip": ["edit", 0], "prompts": ["edit", 1]})
    g.update(stock_reference_predict(f"{name}_trained", ["trainer", 0]))
    g.update(stock_reference_predict(f"{name}_base", ["unet", 0]))
    g.update(predict_nodes(f"{name}_base_noref", ["unet", 0]))  # no reference image
    g[f"pos_{name}_base_noref"]["inputs"]["text"] = "make it red"
    g.update(predict_nodes(f"{name}_trained_wrapped", ["trainer", 0]))  # the node's CLIP, no ReferenceLatent
    g[f"pos_{name}_trained_wrapped"]["inputs"].update({"text": "make it red", "clip": ["edit", 0]})
    assert comfy.run(g, timeout=600)["status"]["status_str"] == "success"
    lat = {t: read_latent(comfy_base, f"{name}_{t}") for t in ("trained", "base", "base_noref", "trained_wrapped")}
    assert float((lat["trained"] - lat["trained_wrapped"]).abs().max()) < 1e-6  # same conditioning as stock
    assert float((lat["base"] - lat["base_noref"]).abs().max()) > 1e-4  # the reference acts on the model
    assert float((lat["trained"] - lat["base"]).abs().max()) > 1e-4

    # stock loaders reproduce the trained model under stock reference conditioning, every key consumed
    log1 = _log_size(comfy)
    g2 = edit_nodes(family_models, fam, video)
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": f"{lora_name}.safetensors", "strength_model": 1.0}}
    g2.update(stock_reference_predict(f"{name}_stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    assert "lora key not loaded" not in _log_since(comfy, log1)
    stock = read_latent(comfy_base, f"{name}_stock")
    assert float((lat["trained"] - stock).abs().max()) < 1e-5

    # the same run without reference images trains another LoRA
    g3 = training_graph(family_models, fam, run + "_noref", lora_name + "_noref")
    g3["prompts"]["inputs"]["prompts"] = INSTRUCTIONS
    assert comfy.run(g3, timeout=600)["status"]["status_str"] == "success"
    with_ref, without = (load_file(str(comfy_base / "models" / "loras" / f"{n}.safetensors"))
                         for n in (lora_name, lora_name + "_noref"))
    assert set(with_ref) == set(without)
    assert max(float((with_ref[k] - without[k]).abs().max()) for k in with_ref) > 1e-6


def test_edit_prompts_need_one_image_per_distinct_instruction(comfy, comfy_base, family_models):
    fam, video = EDIT["kontext"]
    g = edit_nodes(family_models, fam, video)
    g["edit"]["inputs"]["instructions"] = "make it red\nmake it blue\nmake it green"
    g["out"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["edit", 0]}}
    g["ks"] = predict_nodes("edit_bad", ["unet", 0])["ks_edit_bad"]
    g["ks"]["inputs"].update({"positive": ["out", 0], "negative": ["out", 0]})
    g["sl"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "cmp_matrix/edit_bad"}}
    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(g, timeout=300)
    assert "Edit Prompts (reference images): images — 2 image(s) for 3 instruction(s)" in str(err.value)
