"""The source of ``workflows/cpu_demo.json``: the CPU demo graph (API format) and its groups and notes.

    .venv/bin/python tests/cpu_demo_workflow.py     # rebuild workflows/cpu_demo.json in the real frontend
    .venv/bin/python tests/test_workflows.py --thumbnails   # then its thumbnail (workflows/cpu_demo.jpg)

The UI-format file is made the way tests/test_workflows.py makes the other shipped workflows: a real ComfyUI
server and its frontend in headless Chromium load :data:`API` (``app.loadApiJson``), lay the nodes out in the
groups below with a Note per group, and export the graph (``app.graphToPrompt().workflow``, what the
frontend's Export writes). tests/test_demo.py checks that scripts/run_demo.py's converter turns the file back
into exactly :data:`API`.

Settings (tuned on 2 CPU cores; numbers in README "A fresh machine"): 4 prompts per iteration, a 10-step tree
forking at steps 0, 2, 4, 6 (16 leaves and 77 model evaluations per prompt), LoRA rank 8 on the attention and
MLP layers, learning rate 1e-3, 24 iterations (~3 s each), the colourfulness reward. Stronger settings (2e-3 and
up, or more iterations) raise the reward further but turn the shapes into saturated blobs; JPEG compressibility
erases the shapes (on 16x16 pictures the smallest JPEG is an empty one).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "cpu_demo"
TITLE = "CPU demo: BranchGRPO on the embedded tiny model with a colourfulness reward, in minutes"

PROMPTS = ["red circle", "green square", "blue triangle", "yellow ring"]
TEST_PROMPT = "red circle"
ITERATIONS = 24
LEARNING_RATE = 1e-3
RUN_NAME = "cpu_demo"
REWARD_NAME = "colorfulness"
LORA_NAME = "branchgrpo/cpu_demo"

# Node ids are referenced by scripts, tests and the README (e.g. --set 5.iterations=4).
LOADER, PROMPTS_NODE, REWARD, SCHEDULE, TRAINER = "1", "2", "3", "4", "5"
SAVE_LORA, PLOT, SAVE_CURVE = "6", "7", "8"
TRAINER_SETTINGS = "20"


def _titled(node: dict, title: str) -> dict:
    return {**node, "_meta": {"title": title}}


def _ksampler(model, title):
    return _titled({"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": 10, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["9", 0], "negative": ["10", 0], "latent_image": [LOADER, 3], "denoise": 1.0}}, title)


API = {
    LOADER: {"class_type": "BranchGRPODemoModelLoader", "inputs": {"batch_size": 4}},
    PROMPTS_NODE: {"class_type": "BranchGRPOPrompts", "inputs": {"prompts": "\n".join(PROMPTS), "file": "",
                                                                 "eval_count": 0}},
    REWARD: {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": REWARD_NAME}},
    SCHEDULE: _titled({"class_type": "BranchGRPOBranchSchedule", "inputs": {
        "steps": 10, "split_steps": "0,2,4,6", "branching": "2", "split_noise_scale": 4.0, "sde": "dancegrpo",
        "eta": 0.3, "shift": 3.0, "group_size": 1, "sde_window_size": 0, "sde_window_start": 0}},
        "Branch Schedule (10 steps, 16 leaves)"),
    TRAINER: {"class_type": "BranchGRPOTrainer", "inputs": {
        "model": [LOADER, 0], "clip": [LOADER, 1], "vae": [LOADER, 2], "prompts": [PROMPTS_NODE, 0],
        "reward": [REWARD, 0], "latent": [LOADER, 3], "iterations": ITERATIONS, "prompts_per_iteration": len(PROMPTS),
        "learning_rate": LEARNING_RATE, "lora_rank": 8, "lora_alpha": 8.0, "seed": 0, "schedule": [SCHEDULE, 0],
        "settings": [TRAINER_SETTINGS, 0], "run_name": RUN_NAME, "resume": False, "algorithm": "LoRA",
        "continue_lora": "none"}},
    # the settings that differ from the defaults (the frontend fills in the others)
    TRAINER_SETTINGS: {"class_type": "BranchGRPOTrainerSettings", "inputs": {
        "lora_targets": "*attn*,*mlp*", "max_batch": 64, "max_train_batch": 16, "gradient_checkpointing": "off"}},
    SAVE_LORA: {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": [TRAINER, 1], "filename": LORA_NAME,
                                                                "overwrite": True}},
    PLOT: {"class_type": "BranchGRPOMetricsPlot", "inputs": {"metrics": [TRAINER, 2], "width": 768, "height": 512}},
    SAVE_CURVE: _titled({"class_type": "SaveImage", "inputs": {"images": [PLOT, 0],
                                                                "filename_prefix": "branchgrpo/cpu_demo_reward_curve"}},
                        "Save the reward curve"),
    "9": _titled({"class_type": "CLIPTextEncode", "inputs": {"text": TEST_PROMPT, "clip": [LOADER, 1]}},
                 "Test prompt"),
    "10": _titled({"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [LOADER, 1]}},
                  "Negative (empty = unconditional; unused at cfg 1)"),
    "11": _ksampler([LOADER, 0], "KSampler BEFORE (base model)"),
    "12": _ksampler([TRAINER, 0], "KSampler AFTER (base + trained LoRA)"),
    "13": _titled({"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": [LOADER, 2]}},
                  "VAE Decode (before)"),
    "14": _titled({"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": [LOADER, 2]}},
                  "VAE Decode (after)"),
    "15": _titled({"class_type": "BranchGRPOScoreImages", "inputs": {
        "images": ["13", 0], "reward": [REWARD, 0], "prompt": TEST_PROMPT, "as_video": False}}, "Score BEFORE"),
    "16": _titled({"class_type": "BranchGRPOScoreImages", "inputs": {
        "images": ["14", 0], "reward": [REWARD, 0], "prompt": TEST_PROMPT, "as_video": False}}, "Score AFTER"),
    "17": _titled({"class_type": "ImageStitch", "inputs": {
        "image1": ["13", 0], "image2": ["14", 0], "direction": "right", "match_image_size": True,
        "spacing_width": 2, "spacing_color": "white"}}, "Each sample: before (left) | after (right)"),
    "18": _titled({"class_type": "ImageScaleBy", "inputs": {"image": ["17", 0], "upscale_method": "nearest-exact",
                                                             "scale_by": 8.0}}, "Enlarge 8x (16 px -> 128 px)"),
    "19": _titled({"class_type": "SaveImage", "inputs": {"images": ["18", 0],
                                                          "filename_prefix": "branchgrpo/cpu_demo_before_after"}},
                  "Save before / after"),
}

NOTE_MODEL = (
    "The pack's embedded demo model (demo/tiny_t2i.safetensors, 5.6 MB; nothing to download): a tiny text-to-image "
    "flow transformer that draws 16x16 pictures of 8 prompts: red circle, green square, blue triangle, yellow ring, "
    "magenta cross, cyan stripes, orange checkerboard, purple gradient. The loader gives native MODEL, CLIP and VAE "
    "(stock KSampler, CLIP Text Encode and VAE Decode take them) and an empty 16x16 latent. Swap in a real model "
    "(FLUX, SD3.5, Wan) with the stock loaders: see the other templates of this pack.")
NOTE_REWARD = (
    "Training prompts: four of the eight (every iteration trains on all four). Reward: colourfulness (Hasler & "
    "Suesstrunk 2003; ~0 grey, 33 moderately, 59 quite, 109 extremely colourful): it needs no model weights, so it "
    "runs anywhere, and the model can raise it while still drawing what the prompt asks for.\n\n"
    "Try jpeg_compressibility (DDPO's classic) to see reward hacking: on 16x16 pictures the smallest JPEG is an "
    "empty picture, so the model learns to erase the shape.")
NOTE_SCHEDULE = (
    "A small tree for a CPU: 10 denoising steps, forks (K=2) at steps 0, 2, 4, 6, so 16 leaves share their early "
    "steps: 77 model evaluations per prompt instead of 160 for 16 independent samples. The paper's FLUX setting "
    "is 20 steps forking at 0, 3, 6, 9.")
NOTE_TRAIN = (
    "Trainer (BranchGRPO): each iteration samples one tree per prompt, scores the 16 leaves, averages rewards up "
    "the tree into per-depth advantages and takes a PPO-clip step on a rank-8 LoRA (learning rate 1e-3). The "
    "chart on the node shows the "
    "reward rising: about +25 over the 24 iterations, ~3 s each on 2 CPU cores (more iterations or a higher "
    "learning rate go further, until the shapes turn into saturated blobs). Save LoRA writes "
    "models/loras/branchgrpo/cpu_demo.safetensors (ComfyUI's LoRA format: the stock "
    "LoraLoaderModelOnly loads it); the reward curve goes to output/branchgrpo/. Trainer Settings holds the expert "
    "settings: the LoRA adapts the attention and MLP layers, 64 latents per model call.")
NOTE_AFTER = (
    "The same prompt, seed and latent through the stock KSampler twice: BEFORE with the base model, AFTER with the "
    "Trainer's MODEL output (base + the trained LoRA). Score Images shows the reward of each: AFTER should be "
    "higher, and the pictures more vivid, with the same shapes. Four pictures are saved, one per sample: "
    "BEFORE on the left, AFTER on the right, enlarged 8x.")

GROUPS = [
    {"title": "1. Demo model (embedded, CPU)", "color": "#3f789e", "columns": [[LOADER]], "note": NOTE_MODEL},
    {"title": "2. Prompts and reward", "color": "#8a8", "columns": [[PROMPTS_NODE, REWARD]], "note": NOTE_REWARD},
    {"title": "3. Branch schedule", "color": "#a1309b", "columns": [[SCHEDULE]], "note": NOTE_SCHEDULE},
    {"title": "4. Train", "color": "#b58b2a", "columns": [[TRAINER, TRAINER_SETTINGS], [SAVE_LORA, PLOT, SAVE_CURVE]],
     "note": NOTE_TRAIN},
    {"title": "5. Before / after", "color": "#444",
     "columns": [["9", "10"], ["11", "12"], ["13", "14", "15", "16"], ["17", "18", "19"]], "note": NOTE_AFTER},
]
LAYOUT = [[0, 1, 2], [3], [4]]  # columns of groups, top to bottom


def build_spec() -> dict:
    layout = [[GROUPS[i] for i in col] for col in LAYOUT]
    assert sorted(i for col in LAYOUT for i in col) == list(range(len(GROUPS)))
    in_groups = {nid for grp in GROUPS for col in grp["columns"] for nid in col}
    assert in_groups == set(API), f"nodes outside any group: {set(API) - in_groups}"
    return {"name": NAME, "api": API, "layout": layout, "fixed_seeds": True}


def build() -> Path:
    """Write workflows/cpu_demo.json, built in the real frontend (as tests/test_workflows.py builds the others)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run as a script
    from browser_helpers import WORKFLOWS_DIR, ComfyPage, launch
    from comfy_server import ComfyServer
    from test_workflows import BUILD_JS

    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp) / "base") as server, sync_playwright() as pw:
        browser = launch(pw)
        page = ComfyPage(browser, server.url, viewport=(2400, 1500)).open()
        workflow = json.loads(page.js(BUILD_JS, build_spec()))
        errors = page.errors()
        browser.close()
    if errors:
        raise RuntimeError("console errors while generating:\n" + "\n".join(errors))
    workflow.setdefault("extra", {})["branchgrpo"] = {"title": TITLE}
    workflow["extra"].pop("ds", None)
    import workflow_templates  # the description and hardware of each template
    workflow_templates.apply(workflow, NAME)
    path = WORKFLOWS_DIR / f"{NAME}.json"
    path.write_text(json.dumps(workflow, indent=2) + "\n")
    return path


if __name__ == "__main__":
    print("wrote", build())
