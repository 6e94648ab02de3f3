"""The shipped workflows (workflows/*.json, UI format) in the real frontend and the real server.

Every workflows/*.json (ours and any added later) must: be the UI format ComfyUI saves; use only node
types the server (or the frontend, for Note nodes) knows; load in the frontend with no missing node;
convert to an API prompt with ``app.graphToPrompt()``; and pass ``POST /prompt`` validation except for
model files that are not installed here (``value_not_in_list`` / the reward loaders' own file check on
a loader's file-name input). ComfyUI serves the folder as templates under the pack's name.

The workflows are generated from ``SOURCES`` below by the real frontend (API graph -> ``app.loadApiJson``
-> layout, Note nodes and groups -> ``app.graphToPrompt().workflow``, which is what Export saves):

    .venv/bin/python tests/test_workflows.py              # rewrite workflows/<name>.json for SOURCES
    .venv/bin/python tests/test_workflows.py --thumbnails # only the thumbnails (workflows/<stem>.jpg)

Each run also writes a thumbnail workflows/<stem>.jpg for every workflows/*.json (the template
browser shows it; without one it shows an empty card and logs a 404).
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser_helpers import (ComfyPage, browser_missing_reason, http_json, launch,  # noqa: E402
                             shipped_workflows)
from comfy_server import PACK_NAME  # noqa: E402
import workflow_templates  # noqa: E402

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # virtual nodes: never sent to the server
# inputs that name a model file, per loader; the only inputs allowed to fail validation here
FILE_INPUTS = {
    "UNETLoader": {"unet_name"}, "CheckpointLoaderSimple": {"ckpt_name"}, "VAELoader": {"vae_name"},
    "CLIPLoader": {"clip_name"}, "DualCLIPLoader": {"clip_name1", "clip_name2"},
    "TripleCLIPLoader": {"clip_name1", "clip_name2", "clip_name3"}, "LoraLoaderModelOnly": {"lora_name"},
    "LoraLoader": {"lora_name"}, "BranchGRPOHPSLoader": {"checkpoint"}, "BranchGRPOImageRewardLoader": {"checkpoint"},
    "BranchGRPOPickScoreLoader": {"model", "processor"}, "BranchGRPOCLIPScoreLoader": {"model"},
    "BranchGRPOAestheticLoader": {"checkpoint", "clip"}, "BranchGRPOTinyFlowModelLoader": {"weights"},
}
FILE_ERRORS = {"value_not_in_list", "custom_validation_failed"}

# --------------------------------------------------------------------------------------------- sources
TRAIN_PROMPTS = "\n".join([
    "a photo of a red fox in fresh snow, golden hour",
    "a watercolor painting of a lighthouse on a cliff at dawn",
    "a cozy reading nook with a cat sleeping on a pile of books",
    "a futuristic city street at night in the rain, neon reflections",
    "a bowl of ramen on a wooden table, steam rising, studio lighting",
    "an astronaut riding a horse on the moon, cinematic",
    "a portrait of an old fisherman with a weathered face, 85mm photo",
    "a field of sunflowers under a stormy sky",
])
VIDEO_PROMPTS = "\n".join([
    "a golden retriever running along a beach at sunset, waves rolling in",
    "a paper boat drifting down a rainy street gutter, close-up",
    "time-lapse of clouds moving over snowy mountains",
    "a chef tossing vegetables in a flaming wok",
    "a hummingbird hovering at a red flower, slow motion",
])
WAN_NEGATIVE = ("blurry, low quality, static, overexposed, jpeg artifacts, deformed, extra fingers, "
                "worst quality, still picture, cluttered background")


def _schedule(sde="dancegrpo", eta=0.3, shift=3.0, steps=20, split="0,3,6,9", split_noise_scale=0.0):
    """Branch Schedule; split_noise_scale 0 = auto (4.0 for dancegrpo, 1.0 for flowgrpo)."""
    return {"class_type": "BranchGRPOBranchSchedule", "_meta": {"title": "Branch Schedule (BranchGRPO)"},
            "inputs": {"steps": steps, "split_steps": split, "branching": "2", "split_noise_scale": split_noise_scale,
                       "sde": sde, "eta": eta, "shift": shift, "group_size": 1, "sde_window_size": 0,
                       "sde_window_start": 0}}


def _advantage():
    return {"class_type": "BranchGRPOTreeAdvantage", "inputs": {
        "mode": "tree", "fusion": "mean", "temperature": 1.0, "global_std": False, "clip": 5.0}}


def _pruning():
    return {"class_type": "BranchGRPOPruning", "inputs": {
        "depths": "", "depth_slide": True, "slide_interval": 30, "stop_depth": 0, "width_mode": "off",
        "width_ratio": 0.5, "active_fraction": 1.0, "train_last_step": True, "timestep_fraction": 1.0}}


def _trainer(model, clip, vae, prompts, reward, latent, schedule, advantage, pruning, settings, run_name, **over):
    inputs = {"model": model, "clip": clip, "vae": vae, "prompts": prompts, "reward": reward, "latent": latent,
              "iterations": 300, "prompts_per_iteration": 1, "learning_rate": 1e-4, "lora_rank": 16,
              "lora_alpha": 16.0, "seed": 0, "schedule": schedule, "advantage": advantage, "pruning": pruning,
              "settings": settings, "run_name": run_name, "resume": True}
    inputs.update(over)
    return {"class_type": "BranchGRPOTrainer", "inputs": inputs}


def _settings(**over):
    """Trainer Settings (the Trainer's expert settings): the given values; the frontend fills in every other
    setting's default, so an option added to nodes/inputs.py needs no change here."""
    return {"class_type": "BranchGRPOTrainerSettings", "inputs": dict(over)}


def _hps(max_frames=0):
    return {"class_type": "BranchGRPOHPSLoader", "inputs": {
        "checkpoint": "HPS_v2.1_compressed.pt", "dtype": "auto", "batch_size": 8, "max_frames": max_frames,
        "temporal_weight": 0.0}}


def _ksampler(model, pos, neg, latent, steps=20, cfg=1.0, sampler="euler", scheduler="simple", seed=42, title=None):
    node = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": pos, "negative": neg, "latent_image": latent, "denoise": 1.0}}
    if title:
        node["_meta"] = {"title": title}
    return node


def _titled(node, title):
    return {**node, "_meta": {"title": title}}


NOTE_TRAIN_COMMON = (
    "Trainer (BranchGRPO): each iteration samples a branching tree per prompt (the schedule's split steps fork "
    "every path K ways), decodes and scores the leaves, fuses rewards up the tree into per-depth advantages, "
    "prunes, and takes a PPO-clip step on a LoRA. The chart on the node shows reward mean / best / worst, the "
    "advantage spread and the loss per iteration, and the latest tree with its leaves coloured by reward.\n\n"
    "A checkpoint is written after every iteration to output/branchgrpo/<run_name>/; Cancel keeps it and "
    "Run again (resume on) continues. Save LoRA writes models/loras/<filename>.safetensors in ComfyUI's "
    "own key format: load it anywhere with the stock LoraLoaderModelOnly.")

FLUX = {
    "title": "FLUX.1-dev: BranchGRPO LoRA with the HPS v2.1 reward",
    "api": {
        "1": _titled({"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                              "weight_dtype": "default"}}, "Load FLUX.1-dev"),
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                         "device": "default"}},
        "3": _titled({"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}, "Load FLUX VAE"),
        "4": _titled({"class_type": "EmptySD3LatentImage", "inputs": {"width": 720, "height": 720,
                                                                       "batch_size": 1}}, "Training resolution"),
        "5": {"class_type": "BranchGRPOPrompts", "inputs": {"prompts": TRAIN_PROMPTS, "file": "", "eval_count": 0}},
        "6": _hps(),
        "7": _schedule(),
        "8": _advantage(),
        "9": _pruning(),
        "10": _trainer(["1", 0], ["2", 0], ["3", 0], ["5", 0], ["6", 0], ["4", 0], ["7", 0], ["8", 0], ["9", 0],
                       ["20", 0], "flux_hps"),
        "11": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["10", 1], "filename": "branchgrpo/flux_hps",
                                                              "overwrite": True}},
        "12": {"class_type": "BranchGRPOMetricsPlot", "inputs": {"metrics": ["10", 2], "width": 768, "height": 512}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        "14": _titled({"class_type": "CLIPTextEncode", "inputs": {
            "text": "a photo of a red fox in fresh snow, golden hour", "clip": ["2", 0]}}, "Test prompt"),
        "15": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["14", 0], "guidance": 3.5}},
        "16": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["14", 0]}},
        "17": _ksampler(["10", 0], ["15", 0], ["16", 0], ["4", 0], title="KSampler (trained model)"),
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["17", 0], "vae": ["3", 0]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": "branchgrpo/flux_hps"}},
        "20": _settings(flux_guidance=3.5),
    },
    "groups": [
        {"title": "1. Models (stock loaders)", "color": "#3f789e", "columns": [["1", "2", "3"]],
         "note": "FLUX.1-dev with ComfyUI's stock loaders:\n"
                 "- models/diffusion_models/flux1-dev.safetensors (weight_dtype fp8_e4m3fn halves its memory)\n"
                 "- models/text_encoders/clip_l.safetensors and t5xxl_fp16.safetensors (type flux)\n"
                 "- models/vae/ae.safetensors\n"
                 "Any LoRA applied before the Trainer keeps acting while the new LoRA trains."},
        {"title": "2. Prompts and reward", "color": "#8a8", "columns": [["5", "6", "4"]],
         "note": "One training prompt per line (or a .txt file from ComfyUI's input folder; eval_count holds "
                 "some out). HPS v2.1 (preference reward): put HPS_v2.1_compressed.pt in models/reward_models/. "
                 "PickScore, ImageReward, CLIP score, aesthetic and Reward Mix are drop-in alternatives. "
                 "The empty latent sets the training resolution (720x720 as in the paper); only its shape is used."},
        {"title": "3. BranchGRPO settings", "color": "#a1309b", "columns": [["7", "8", "9"]],
         "note": "Branch Schedule: 20 steps, forks at steps 0,3,6,9 with K=2 (16 leaves per prompt), DanceGRPO "
                 "SDE eta 0.3, shift 3: the paper's FLUX setting. Tree Advantage: rewards averaged up the tree, "
                 "normalised per depth. Pruning: off here; depth pruning (e.g. depths 10-19, sliding) and width "
                 "pruning (best_worst) cut the update cost."},
        {"title": "4. Train", "color": "#b58b2a", "columns": [["10", "20"], ["11", "12", "13"]],
         "note": NOTE_TRAIN_COMMON + "\n\nTrainer Settings: FLUX guidance 3.5 (FLUX-dev's distilled guidance), cfg 1."
                 "\n\nMemory: FLUX at 720 px needs a 48-80 GB GPU; lower max_batch, "
                 "max_train_batch or the resolution, keep gradient_checkpointing on auto, or load the UNET in fp8."},
        {"title": "5. Try the trained model", "color": "#444", "columns": [["14", "15", "16"], ["17", "18", "19"]],
         "note": "Samples with the MODEL output of the Trainer (base + trained LoRA). FLUX.1-dev is guidance-"
                 "distilled: cfg 1 with FluxGuidance 3.5, as in ComfyUI's own FLUX templates."},
    ],
}

SD35 = {
    "title": "SD3.5 Medium: BranchGRPO LoRA with the PickScore reward",
    "api": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "2": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                           "clip_name2": "clip_g.safetensors",
                                                           "clip_name3": "t5xxl_fp16.safetensors"}},
        "3": _titled({"class_type": "EmptySD3LatentImage", "inputs": {"width": 512, "height": 512,
                                                                       "batch_size": 1}}, "Training resolution"),
        "4": {"class_type": "BranchGRPOPrompts", "inputs": {"prompts": TRAIN_PROMPTS, "file": "", "eval_count": 0}},
        "5": {"class_type": "BranchGRPOPickScoreLoader", "inputs": {
            "model": "PickScore_v1", "processor": "auto", "dtype": "auto", "batch_size": 8, "max_frames": 0,
            "temporal_weight": 0.0}},
        "6": _schedule(sde="flowgrpo", eta=0.7),
        "7": _advantage(),
        "8": _pruning(),
        "9": _trainer(["1", 0], ["2", 0], ["1", 2], ["4", 0], ["5", 0], ["3", 0], ["6", 0], ["7", 0], ["8", 0],
                      ["18", 0], "sd35m_pickscore"),
        "10": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["9", 1],
                                                              "filename": "branchgrpo/sd35m_pickscore",
                                                              "overwrite": True}},
        "11": {"class_type": "BranchGRPOMetricsPlot", "inputs": {"metrics": ["9", 2], "width": 768, "height": 512}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
        "13": _titled({"class_type": "CLIPTextEncode", "inputs": {
            "text": "a cozy reading nook with a cat sleeping on a pile of books", "clip": ["2", 0]}}, "Test prompt"),
        "14": _titled({"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}}, "Negative prompt"),
        "15": _ksampler(["9", 0], ["13", 0], ["14", 0], ["3", 0], steps=28, cfg=4.5, title="KSampler (trained model)"),
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "branchgrpo/sd35m"}},
        "18": _settings(cfg=4.5, negative_prompt="", max_batch=8),
    },
    "groups": [
        {"title": "1. Models (stock loaders)", "color": "#3f789e", "columns": [["1", "2"]],
         "note": "Stable Diffusion 3.5 Medium with ComfyUI's stock loaders:\n"
                 "- models/checkpoints/sd3.5_medium.safetensors (MMDiT + VAE)\n"
                 "- models/text_encoders/clip_l, clip_g, t5xxl_fp16 (TripleCLIPLoader)\n"
                 "A checkpoint that bundles the text encoders works too: connect its CLIP instead."},
        {"title": "2. Prompts and reward", "color": "#8a8", "columns": [["4", "5", "3"]],
         "note": "PickScore v1 (preference reward): put the PickScore_v1 folder (config.json + weights) and its "
                 "processor in models/reward_models/. Swap in the HPS or ImageReward loader, or mix several with "
                 "Reward Mix. 512x512 as in Flow-GRPO's SD3.5 runs."},
        {"title": "3. BranchGRPO settings", "color": "#a1309b", "columns": [["6", "7", "8"]],
         "note": "Flow-GRPO's SDE (noise level a = 0.7) on a 20-step schedule forking at 0,3,6,9 (K=2), fork noise "
                 "scale auto (1.0 for this SDE: 4.0 would leave the leaves noisy). SD3.5 needs real CFG: Trainer "
                 "Settings sets cfg 4.5, so each model call costs two evaluations."},
        {"title": "4. Train", "color": "#b58b2a", "columns": [["9", "18"], ["10", "11", "12"]],
         "note": NOTE_TRAIN_COMMON + "\n\nMemory: about 24 GB at 512 px with cfg; lower max_batch / "
                 "max_train_batch first if it runs out."},
        {"title": "5. Try the trained model", "color": "#444", "columns": [["13", "14"], ["15", "16", "17"]],
         "note": "Samples with the Trainer's MODEL output (base + trained LoRA), cfg 4.5 as in training."},
    ],
}

WAN = {
    "title": "Wan 2.1 1.3B text-to-video: BranchGRPO LoRA with a per-frame HPS reward",
    "api": {
        "1": _titled({"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                                                              "weight_dtype": "default"}}, "Load Wan 2.1 T2V 1.3B"),
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                     "type": "wan", "device": "default"}},
        "3": _titled({"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
                     "Load Wan VAE"),
        "4": _titled({"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 480, "height": 272,
                                                                           "length": 17, "batch_size": 1}},
                     "Training size (480x272, 17 frames)"),
        "5": {"class_type": "BranchGRPOPrompts", "inputs": {"prompts": VIDEO_PROMPTS, "file": "", "eval_count": 0}},
        "6": _hps(max_frames=8),
        "7": _schedule(shift=8.0),
        "8": _advantage(),
        "9": _pruning(),
        "10": _trainer(["1", 0], ["2", 0], ["3", 0], ["5", 0], ["6", 0], ["4", 0], ["7", 0], ["8", 0], ["9", 0],
                       ["19", 0], "wan21_t2v_hps", iterations=200),
        "11": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["10", 1],
                                                              "filename": "branchgrpo/wan21_t2v_hps",
                                                              "overwrite": True}},
        "12": {"class_type": "BranchGRPOMetricsPlot", "inputs": {"metrics": ["10", 2], "width": 768, "height": 512}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        "14": _titled({"class_type": "CLIPTextEncode", "inputs": {
            "text": "a golden retriever running along a beach at sunset, waves rolling in", "clip": ["2", 0]}},
            "Test prompt"),
        "15": _titled({"class_type": "CLIPTextEncode", "inputs": {"text": WAN_NEGATIVE, "clip": ["2", 0]}},
                      "Negative prompt"),
        "16": _ksampler(["10", 0], ["14", 0], ["15", 0], ["4", 0], steps=30, cfg=5.0, sampler="uni_pc",
                        title="KSampler (trained model)"),
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["3", 0]}},
        "18": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["17", 0], "filename_prefix": "branchgrpo/wan21",
                                                            "fps": 16.0, "lossless": False, "quality": 90,
                                                            "method": "default"}},
        "19": _settings(cfg=5.0, negative_prompt=WAN_NEGATIVE, max_batch=4, max_train_batch=1),
    },
    "groups": [
        {"title": "1. Models (stock loaders)", "color": "#3f789e", "columns": [["1", "2", "3"]],
         "note": "Wan 2.1 text-to-video 1.3B with ComfyUI's stock loaders (Comfy-Org repackaged files):\n"
                 "- models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors\n"
                 "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (type wan)\n"
                 "- models/vae/wan_2.1_vae.safetensors"},
        {"title": "2. Prompts and reward", "color": "#8a8", "columns": [["5", "6", "4"]],
         "note": "Video leaves are scored frame by frame with an image reward (HPS v2.1 here, on up to 8 evenly "
                 "spaced frames) and averaged into one reward per video. The empty video latent sets size and "
                 "length (frames = 4n+1); memory grows with both."},
        {"title": "3. BranchGRPO settings", "color": "#a1309b", "columns": [["7", "8", "9"]],
         "note": "The same tree as for images: video latents [C, T, H, W] go through the same rollout, advantages "
                 "and loss. Shift 8 matches Wan 2.1's own sampling schedule."},
        {"title": "4. Train", "color": "#b58b2a", "columns": [["10", "19"], ["11", "12", "13"]],
         "note": NOTE_TRAIN_COMMON + "\n\nWan needs real CFG (cfg 5 with the negative prompt): each model call "
                 "costs two evaluations. max_train_batch 1 keeps video activations small."},
        {"title": "5. Try the trained model", "color": "#444", "columns": [["14", "15"], ["16", "17", "18"]],
         "note": "Samples a clip with the Trainer's MODEL output (base + trained LoRA) and saves an animated WEBP."},
    ],
}

EVAL = {
    "title": "Before / after: the base model and the exported LoRA, same seed, scored side by side",
    "api": {
        "1": _titled({"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                              "weight_dtype": "default"}}, "Load FLUX.1-dev"),
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                         "device": "default"}},
        "3": _titled({"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}, "Load FLUX VAE"),
        "4": _titled({"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "branchgrpo/flux_hps.safetensors", "strength_model": 1.0}},
            "Load the BranchGRPO LoRA"),
        "5": _titled({"class_type": "PrimitiveStringMultiline", "inputs": {
            "value": "a portrait of an old fisherman with a weathered face, 85mm photo"}}, "Prompt (shared)"),
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["5", 0], "clip": ["2", 0]}},
        "7": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "8": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "9": _titled({"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024,
                                                                       "batch_size": 4}}, "4 images per side"),
        "10": _ksampler(["1", 0], ["7", 0], ["8", 0], ["9", 0], title="KSampler BEFORE (base)"),
        "11": _ksampler(["4", 0], ["7", 0], ["8", 0], ["9", 0], title="KSampler AFTER (base + LoRA)"),
        "12": _titled({"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
                      "VAE Decode (before)"),
        "13": _titled({"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
                      "VAE Decode (after)"),
        "14": _hps(),
        "15": _titled({"class_type": "BranchGRPOScoreImages", "inputs": {
            "images": ["12", 0], "reward": ["14", 0], "prompt": ["5", 0], "as_video": False}}, "Score BEFORE"),
        "16": _titled({"class_type": "BranchGRPOScoreImages", "inputs": {
            "images": ["13", 0], "reward": ["14", 0], "prompt": ["5", 0], "as_video": False}}, "Score AFTER"),
        "17": _titled({"class_type": "ImageStitch", "inputs": {
            "image1": ["12", 0], "image2": ["13", 0], "direction": "right", "match_image_size": True,
            "spacing_width": 16, "spacing_color": "white"}}, "Side by side (left: before, right: after)"),
        "18": {"class_type": "SaveImage", "inputs": {"images": ["17", 0],
                                                     "filename_prefix": "branchgrpo/eval_before_after"}},
    },
    "fixed_seeds": True,
    "groups": [
        {"title": "1. Base model and the exported LoRA", "color": "#3f789e", "columns": [["1", "2", "3", "4"]],
         "note": "The same stock loaders as for training, plus the stock LoraLoaderModelOnly with the file Save "
                 "LoRA wrote (models/loras/branchgrpo/flux_hps.safetensors). No BranchGRPO node is needed to use "
                 "a trained LoRA; this graph only uses ours to score."},
        {"title": "2. Same prompt, same seed, same latent", "color": "#8a8", "columns": [["5", "6"], ["7", "8", "9"]],
         "note": "Both samplers get the same conditioning, latent batch and seed (fixed, not randomized), so "
                 "every difference between the two sides comes from the LoRA."},
        {"title": "3. Before and after", "color": "#b58b2a", "columns": [["10", "12"], ["11", "13"]],
         "note": "KSampler BEFORE runs the base model, KSampler AFTER the base model with the LoRA."},
        {"title": "4. Score both sides with the training reward", "color": "#a1309b",
         "columns": [["14", "15", "16"], ["17", "18"]],
         "note": "Score Images shows one score per image and the mean on each node: after training the AFTER "
                 "mean should be higher. Score with a different reward too, to catch reward hacking. The "
                 "saved image puts before (left) and after (right) side by side."},
    ],
}

SOURCES = {
    "flux_branchgrpo_hps": FLUX,
    "sd35_branchgrpo_pickscore": SD35,
    "wan21_t2v_branchgrpo": WAN,
    "eval_before_after": EVAL,
}

# Runs in the page: API graph -> loadApiJson -> layout in group blocks, Note per group, groups ->
# the workflow exactly as Export saves it.
BUILD_JS = r"""
async (spec) => {
  await app.loadApiJson(spec.api, spec.name + ".json");
  const g = app.graph;
  const GAP = 30, PAD = 20, TITLE = 90, NOTE_W = 380;
  const byId = (id) => g.getNodeById(isNaN(+id) ? id : +id);
  if (spec.fixed_seeds) {
    for (const n of g.nodes) for (const w of n.widgets ?? [])
      if (w.name === "control_after_generate") w.value = "fixed";
  }
  for (const n of g.nodes) {  // the size the node gets once drawn (DOM widgets included), and room for images
    const s = n.computeSize();
    const big = ["PreviewImage", "SaveImage", "SaveAnimatedWEBP"].includes(n.type) ? [360, 320] : [0, 0];
    n.setSize([Math.max(n.size[0], s[0], big[0]), Math.max(n.size[1], s[1], big[1])]);
  }
  let x0 = 0;
  const placed = [];
  for (const column of spec.layout) {
    let y = 0, colW = 0;
    for (const grp of column) {
      const note = LiteGraph.createNode("Note");
      note.widgets[0].value = grp.note;
      note.title = "Note: " + grp.title.replace(/^\d+\.\s*/, "");
      g.add(note);
      const cols = grp.columns.map((ids) => ids.map(byId));
      const widths = cols.map((ns) => Math.max(...ns.map((n) => n.size[0])));
      const inner = Math.max(NOTE_W, widths.reduce((a, b) => a + b, 0) + GAP * (cols.length - 1));
      note.size = [inner, Math.max(100, 40 + 17 * Math.ceil(grp.note.length / (inner / 7.2)))];
      note.pos = [x0 + PAD, y + TITLE];
      const top = note.pos[1] + note.size[1] + GAP + LiteGraph.NODE_TITLE_HEIGHT;
      let cx = x0 + PAD;
      cols.forEach((ns, i) => {
        let cy = top;
        for (const n of ns) { n.pos = [cx, cy]; cy += n.size[1] + GAP + LiteGraph.NODE_TITLE_HEIGHT; }
        cx += widths[i] + GAP;
      });
      const members = [note, ...cols.flat()];
      const H = LiteGraph.NODE_TITLE_HEIGHT;
      const left = Math.min(...members.map((n) => n.pos[0])) - PAD;
      const topY = Math.min(...members.map((n) => n.pos[1] - H)) - PAD - 34;  // 34: the group's title bar
      const right = Math.max(...members.map((n) => n.pos[0] + n.size[0])) + PAD;
      const bottomY = Math.max(...members.map((n) => n.pos[1] + n.size[1])) + PAD;
      const group = new LiteGraph.LGraphGroup(grp.title);
      group.color = grp.color;
      group.pos = [left, topY];
      group.size = [right - left, bottomY - topY];
      g.add(group);
      placed.push(group);
      colW = Math.max(colW, group.size[0]);
      y = group.pos[1] + group.size[1] + 2 * GAP;
    }
    x0 += colW + 2 * GAP;
  }
  g.setDirtyCanvas(true, true);
  const { workflow } = await app.graphToPrompt();
  return JSON.stringify(workflow);  // as Export writes it (Playwright would turn undefined into null)
}
"""

# Where each group block goes: columns of groups (top to bottom).
LAYOUTS = {
    "flux_branchgrpo_hps": [[0, 1], [2], [3], [4]],
    "sd35_branchgrpo_pickscore": [[0, 1], [2], [3], [4]],
    "wan21_t2v_branchgrpo": [[0, 1], [2], [3], [4]],
    "eval_before_after": [[0, 1], [2], [3]],
}


def build_spec(name: str) -> dict:
    src = SOURCES[name]
    groups = src["groups"]
    layout = [[groups[i] for i in col] for col in LAYOUTS[name]]
    used = {i for col in LAYOUTS[name] for i in col}
    assert used == set(range(len(groups))), f"{name}: layout must place every group once"
    in_groups = {nid for grp in groups for col in grp["columns"] for nid in col}
    assert in_groups == set(src["api"]), f"{name}: nodes outside any group: {set(src['api']) - in_groups}"
    return {"name": name, "api": src["api"], "layout": layout, "fixed_seeds": src.get("fixed_seeds", False)}


FIT_JS = r"""
() => {
  app.extensionManager.focusMode = true;  // no menus or side bars in the picture
  app.canvas.show_info = false;
  const c = app.canvas, b = [Infinity, Infinity, -Infinity, -Infinity];
  for (const it of [...app.graph.nodes, ...app.graph.groups]) {
    const [x, y] = it.pos, [w, h] = it.size;
    b[0] = Math.min(b[0], x); b[1] = Math.min(b[1], y - 40); b[2] = Math.max(b[2], x + w); b[3] = Math.max(b[3], y + h);
  }
  const el = c.canvas.getBoundingClientRect();
  const s = Math.min(el.width / (b[2] - b[0] + 60), el.height / (b[3] - b[1] + 60));
  c.ds.scale = s;
  c.ds.offset = [-b[0] + (el.width / s - (b[2] - b[0])) / 2, -b[1] + (el.height / s - (b[3] - b[1])) / 2];
  c.setDirty(true, true);
}
"""
THUMBNAIL_SIZE = (800, 500)  # the template browser shows <name>.jpg next to <name>.json


def regenerate(names=None, workflows=True) -> list[Path]:
    """Write workflows/<name>.json for SOURCES (all by default; none with workflows=False), built in the
    real frontend, then a thumbnail workflows/<stem>.jpg for every workflows/*.json."""
    import io
    import tempfile

    from PIL import Image
    from playwright.sync_api import sync_playwright

    from browser_helpers import WORKFLOWS_DIR
    from comfy_server import ComfyServer

    names = (list(names or SOURCES)) if workflows else []
    written = []
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp) / "base") as server, \
            sync_playwright() as pw:
        browser = launch(pw)
        page = ComfyPage(browser, server.url, viewport=(2400, 1500)).open()
        for name in names:
            workflow = json.loads(page.js(BUILD_JS, build_spec(name)))
            workflow.setdefault("extra", {})["branchgrpo"] = {"title": SOURCES[name]["title"]}
            workflow["extra"].pop("ds", None)  # the viewport of the generating page: not part of the file
            workflow_templates.apply(workflow, name)
            path = WORKFLOWS_DIR / f"{name}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(workflow, indent=2) + "\n")
            written.append(path)
        for path in shipped_workflows():
            page.js("async (w) => { await app.loadGraphData(w); }", json.loads(path.read_text()))
            page.js(FIT_JS)
            page.page.wait_for_timeout(500)
            png = page.page.screenshot(type="png")
            image = Image.open(io.BytesIO(png)).convert("RGB")
            image.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)
            thumb = path.with_suffix(".jpg")
            image.save(thumb, "JPEG", quality=82, optimize=True)
            written.append(thumb)
        errors = page.errors()
        browser.close()
    if errors:
        raise RuntimeError("console errors while generating:\n" + "\n".join(errors))
    return written


# --------------------------------------------------------------------------------------------- tests
WORKFLOWS = shipped_workflows()
IDS = [p.stem for p in WORKFLOWS]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_workflows_folder_has_the_shipped_workflows():
    assert {f"{n}.json" for n in SOURCES} <= {p.name for p in WORKFLOWS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_is_ui_format(path):
    wf = _load(path)
    assert isinstance(wf.get("nodes"), list) and wf["nodes"], "UI format has a node list"
    assert isinstance(wf.get("links"), list) and "last_node_id" in wf and "version" in wf
    assert not all(isinstance(v, dict) and "class_type" in v for v in wf.values()), "this is the API format"
    ids = {n["id"] for n in wf["nodes"]}
    assert len(ids) == len(wf["nodes"]), "node ids are unique"
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "mode"} <= set(n), n.get("type")
    for link in wf["links"]:  # [id, origin_id, origin_slot, target_id, target_slot, type]
        assert link[1] in ids and link[3] in ids, f"dangling link {link}"
    if path.stem in SOURCES:
        notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert len(wf.get("groups") or []) == len(SOURCES[path.stem]["groups"]) == len(notes)
        assert all(n["widgets_values"][0].strip() for n in notes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_uses_only_known_node_types(comfy, path):
    info = comfy.object_info()
    types = {n["type"] for n in _load(path)["nodes"]}
    assert not sorted(types - set(info) - FRONTEND_ONLY)


def test_workflows_are_served_as_templates(comfy):
    status, listing = http_json(comfy.url + "/api/workflow_templates")
    assert status == 200
    assert sorted(listing.get(PACK_NAME, [])) == sorted(IDS), listing
    for path in WORKFLOWS:
        status, body = http_json(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{path.name}")
        assert status == 200 and body == _load(path), path.name
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"no thumbnail {thumb.name}: run .venv/bin/python tests/test_workflows.py --thumbnails"
        req = urllib.request.Request(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{thumb.name}")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", thumb.name


# ------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def page(comfy):
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = launch(pw)
        cp = ComfyPage(browser, comfy.url).open()
        yield cp
        cp.close()
        browser.close()


LOAD_JS = r"""
async (workflow) => {
  const missing = new Set();
  const orig = app.showMissingNodesError;
  app.showMissingNodesError = (types) => { for (const t of types) missing.add(t?.type ?? String(t)); };
  try {
    await app.loadGraphData(workflow, true, true, "test_" + Date.now());
  } finally {
    app.showMissingNodesError = orig;
  }
  for (const n of app.graph.nodes) {
    if (!LiteGraph.registered_node_types[n.type]) missing.add(n.type);
    if (n.has_errors) missing.add(n.type + " (has_errors)");
  }
  const dialog = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText).join("\n");
  const { output } = await app.graphToPrompt();
  return { missing: [...missing], dialog, output,
           nodes: app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type, mode: n.mode,
                                                 virtual: !!n.isVirtualNode })) };
}
"""


def _load_in_page(page, workflow) -> dict:
    res = page.js(LOAD_JS, workflow)
    page.js("() => document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click())")
    return res


def test_missing_node_check_catches_an_unknown_type(page):
    """The check below is not vacuous: a workflow with an unknown node type is reported."""
    wf = _load(WORKFLOWS[0])
    wf = json.loads(json.dumps(wf))
    wf["nodes"][0]["type"] = "BranchGRPODoesNotExist"
    res = _load_in_page(page, wf)
    assert "BranchGRPODoesNotExist" in " ".join(res["missing"]) + res["dialog"]


def _cancel_if_queued(comfy, prompt_id, timeout_s=120.0):
    """A prompt that validated (e.g. a CPU demo whose models exist) is dropped, not run to the end:
    deleted while pending, interrupted once running; returns when the queue no longer holds it."""
    comfy.post("/queue", {"delete": [prompt_id]})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, q = http_json(comfy.url + "/queue")
        running = {item[1] for item in q["queue_running"]}
        pending = {item[1] for item in q["queue_pending"]}
        if prompt_id not in running | pending:
            return
        if prompt_id in running:
            comfy.interrupt()
        else:
            comfy.post("/queue", {"delete": [prompt_id]})
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} still queued after {timeout_s:.0f} s")


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_loads_converts_and_validates(page, comfy, path):
    t0 = time.monotonic()
    wf = _load(path)
    res = _load_in_page(page, wf)
    assert not res["missing"], f"missing node types: {res['missing']}"
    assert "missing" not in res["dialog"].lower(), res["dialog"]
    output = res["output"]
    real = [n for n in res["nodes"] if not n["virtual"] and n["type"] not in FRONTEND_ONLY and n["mode"] == 0]
    assert {n["id"] for n in real} == set(output), "every active node is in the API prompt"
    for nid, node in output.items():
        assert node["class_type"] == next(n["type"] for n in real if n["id"] == nid)
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in output, f"{nid} links to {value[0]}, which is not in the prompt"

    status, body = http_json(comfy.url + "/prompt", {"prompt": output, "client_id": comfy.client_id})
    if status == 200:
        _cancel_if_queued(comfy, body["prompt_id"])
        return
    assert status == 400, body
    node_errors = body.get("node_errors") or {}
    assert node_errors, f"refused without node errors: {body.get('error')}"
    for nid, entry in node_errors.items():
        cls = entry.get("class_type")
        for err in entry.get("errors", []):
            field = (err.get("extra_info") or {}).get("input_name")
            assert err.get("type") in FILE_ERRORS and field in FILE_INPUTS.get(cls, ()), \
                f"{path.name}: node {nid} ({cls}) fails validation for a reason other than a missing model " \
                f"file: {err}"
    assert time.monotonic() - t0 < 30


def test_template_browser_lists_our_workflows_and_opens_one(page, tmp_path):
    """ComfyUI's own template browser (Workflow > Browse Templates > Extensions > our pack): a card and a
    thumbnail per workflow, and a click that opens the workflow."""
    thumbs = {}
    page.page.on("response", lambda r: f"/workflow_templates/{PACK_NAME}/" in r.url and r.url.endswith(".jpg")
                 and thumbs.__setitem__(r.url.rsplit("/", 1)[-1], r.status))
    page.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.page.locator(".p-dialog")
    dialog.get_by_text(PACK_NAME, exact=True).first.click()
    for stem in IDS:
        dialog.locator(f'[data-testid="template-workflow-{stem}"]').wait_for(timeout=30_000)
    deadline = time.monotonic() + 20
    while len(thumbs) < len(IDS) and time.monotonic() < deadline:
        page.page.wait_for_timeout(200)
    assert thumbs == {f"{stem}.jpg": 200 for stem in IDS}
    page.screenshot(tmp_path / "template_browser.png")
    dialog.locator('[data-testid="template-workflow-flux_branchgrpo_hps"]').click()
    page.wait_js("() => app.graph.nodes.some((n) => n.type === 'BranchGRPOTrainer')"
                 " && app.graph.nodes.some((n) => n.type === 'BranchGRPOHPSLoader')", timeout_s=30)


def test_page_has_no_console_errors_after_loading_the_workflows(page):
    assert not page.errors(), "\n".join(page.errors())


if __name__ == "__main__":
    args = sys.argv[1:]
    only_thumbnails = "--thumbnails" in args
    for p in regenerate([a for a in args if not a.startswith("--")] or None, workflows=not only_thumbnails):
        print("wrote", p)
