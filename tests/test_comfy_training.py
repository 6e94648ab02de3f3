"""The pack inside a real ComfyUI server: training graphs, LoRA export through stock loaders, upstream
LoRAs, bad input, interrupt and resume. Tiny random-weight models; needs scripts/setup_dev.sh."""
from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from comfy_server import ComfyExecutionError, ComfyQueueError

pytestmark = pytest.mark.comfy

PACK_NODES = {"BranchGRPOBranchSchedule", "BranchGRPOTreeAdvantage", "BranchGRPOPruning", "BranchGRPOPrompts",
              "BranchGRPOTreeSampler", "BranchGRPOTrainer", "BranchGRPOTrainerSettings", "BranchGRPOSaveLoRA",
              "BranchGRPOMetricsPlot", "BranchGRPOWeightFreeReward"}
# The Trainer Settings node's inputs (nodes/inputs.py EXPERT_OPTIONS; checked against /object_info below).
EXPERT_INPUTS = ("lora_targets", "clip_range", "kl_beta", "edges_per_step", "max_grad_norm", "max_batch",
                 "max_train_batch", "gradient_checkpointing", "memory_budget_gb", "base_weights", "release_models",
                 "cfg", "negative_prompt", "flux_guidance", "eval_every")


def split_settings(graph: dict) -> dict:
    """Move expert inputs written on a Trainer node into a Trainer Settings node ``<id>_settings`` linked to
    its ``settings`` input (the graph is changed in place and returned). Settings not given keep their
    defaults on the server."""
    for nid, node in list(graph.items()):
        if node.get("class_type") != "BranchGRPOTrainer":
            continue
        expert = {k: node["inputs"].pop(k) for k in list(node["inputs"]) if k in EXPERT_INPUTS}
        if expert:
            graph[f"{nid}_settings"] = {"class_type": "BranchGRPOTrainerSettings", "inputs": expert}
            node["inputs"]["settings"] = [f"{nid}_settings", 0]
    return graph


@pytest.fixture(scope="module")
def models(comfy_base):
    paths = tm.write_all_tiny(comfy_base / "models")
    paths["clip_l"] = tm.write_random_clip_l(comfy_base / "models")
    return paths


def _files(root) -> set[str]:
    out = set()
    for base in ("models/loras", "output/branchgrpo"):
        d = root / base
        if d.exists():
            out |= {str(p.relative_to(root)) for p in d.rglob("*") if p.is_file()}
    return out


def training_graph(models, run_name, *, iterations=2, split_steps="0,2", branching="2", steps=6, prompts=None,
                   upstream_lora=None, lora_file="branchgrpo/test_lora", memory_budget_gb=0.0, extra=None,
                   eps_model=False, resume=False):
    unet_src = ["unet", 0]
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": models["sd3"].name, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": models["clip_l"].name, "type": "sd3"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models["taesd_vae"].name}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "prompts": {"class_type": "BranchGRPOPrompts", "inputs": {
            "prompts": prompts if prompts is not None else "a red cube\na blue ball", "file": "", "eval_count": 0}},
        "reward": {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": "brightness"}},
        "schedule": {"class_type": "BranchGRPOBranchSchedule", "inputs": {
            "steps": steps, "split_steps": split_steps, "branching": branching, "split_noise_scale": 4.0,
            "sde": "dancegrpo", "eta": 0.3, "shift": 3.0, "group_size": 1, "sde_window_size": 0,
            "sde_window_start": 0}},
        "trainer": {"class_type": "BranchGRPOTrainer", "inputs": {
            "model": unet_src, "clip": ["clip", 0], "vae": ["vae", 0], "prompts": ["prompts", 0],
            "reward": ["reward", 0], "latent": ["latent", 0], "iterations": iterations, "prompts_per_iteration": 1,
            "learning_rate": 2e-2, "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": "*", "seed": 3,
            "schedule": ["schedule", 0], "run_name": run_name, "resume": resume,
            "memory_budget_gb": memory_budget_gb, "max_train_batch": 8}},
        "save": {"class_type": "BranchGRPOSaveLoRA", "inputs": {"lora": ["trainer", 1], "filename": lora_file,
                                                               "overwrite": True}},
        "plot": {"class_type": "BranchGRPOMetricsPlot", "inputs": {"metrics": ["trainer", 2], "width": 512,
                                                                  "height": 384}},
        "plot_out": {"class_type": "PreviewImage", "inputs": {"images": ["plot", 0]}},
    }
    if upstream_lora:
        g["up"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": upstream_lora,
                                                                  "strength_model": 1.0}}
        g["trainer"]["inputs"]["model"] = ["up", 0]
    if eps_model:
        g["eps"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["unet", 0], "sampling": "eps",
                                                                     "zsnr": False}}
        g["trainer"]["inputs"]["model"] = ["eps", 0]
    g.update(extra or {})
    return split_settings(g)


def predict_nodes(tag, model_ref):
    """KSampler (2 Euler steps, fixed seed, cfg 1) on ``model_ref`` -> SaveLatent ``cmp/<tag>``."""
    return {
        f"pos_{tag}": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["clip", 0]}},
        f"ks_{tag}": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [f"pos_{tag}", 0], "negative": [f"pos_{tag}", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        f"sl_{tag}": {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{tag}", 0], "filename_prefix": f"cmp/{tag}"}},
    }


def read_latent(comfy_base, tag):
    files = sorted((comfy_base / "output" / "cmp").glob(f"{tag}_*.latent"))
    assert files, f"no latent saved for {tag}"
    return load_file(str(files[-1]))["latent_tensor"]


def test_object_info_lists_every_node_with_tooltips(comfy):
    info = comfy.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("BranchGRPO")}
    assert PACK_NODES <= set(ours)
    for name, node in ours.items():
        assert node.get("description"), f"{name} has no description"
        for section in ("required", "optional"):
            for inp, spec in (node["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
        assert all(node.get("output_tooltips") or [None]), f"{name} outputs lack tooltips"


def test_training_graph_writes_lora_reports_metrics_and_loads_in_stock_loader(comfy, comfy_base, models):
    log0 = len(comfy.server.log_path.read_text(errors="replace"))
    graph = training_graph(models, "train_ok", lora_file="branchgrpo/test_lora",
                           extra={**predict_nodes("trained", ["trainer", 0]), **predict_nodes("base", ["unet", 0])})
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    pid = entry["prompt"][1]
    metrics = [m["data"] for m in comfy.messages_for(pid, "branchgrpo.metrics")]
    assert all(m["run"] == "train_ok" for m in metrics)
    progress = comfy.messages_for(pid, "progress")
    assert any((m["data"] or {}).get("node") == "trainer" for m in progress), "no progress from the Trainer"
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert {"reward_mean", "reward_max", "reward_min", "loss", "adv_std"} <= set(metrics[-1]["metrics"])
    assert metrics[-1]["tree"]["widths"] == [1, 2, 2, 4, 4, 4, 4]
    lora_path = comfy_base / "models" / "loras" / "branchgrpo" / "test_lora.safetensors"
    assert lora_path.is_file()
    sd = load_file(str(lora_path))
    assert sd and all(re.match(r"^diffusion_model\..+\.(lora_up\.weight|lora_down\.weight|alpha)$", k) for k in sd)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert (comfy_base / "output" / "branchgrpo" / "train_ok" / "checkpoint.pt").is_file()
    assert entry["outputs"]["plot_out"]["images"]

    # a second graph: stock UNETLoader + LoraLoaderModelOnly with the exported file
    log1 = len(comfy.server.log_path.read_text(errors="replace"))
    g2 = {k: graph[k] for k in ("unet", "clip", "latent")}
    g2["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": "branchgrpo/test_lora.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes("stock", ["lora", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    log = comfy.server.log_path.read_text(errors="replace")
    assert "lora key not loaded" not in log[log1:], "an exported key was not consumed by ComfyUI's LoRA loader"
    trained, stock, base = (read_latent(comfy_base, t) for t in ("trained", "stock", "base"))
    assert float((trained - stock).abs().max()) < 1e-5
    assert float((trained - base).abs().max()) > 1e-3
    assert "Traceback" not in log[log0:log1]


def _upstream_lora(comfy_base) -> str:
    """A random LoRA on the tiny SD3's attention projections, in ComfyUI's key format."""
    sd3 = tm.sd3_state_dict()
    g = torch.Generator().manual_seed(9)
    out = {}
    for key, w in sd3.items():
        if key.endswith("attn.qkv.weight") and w.dim() == 2:
            m = key[: -len(".weight")]
            out[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.5
            out[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.5
            out[f"diffusion_model.{m}.alpha"] = torch.tensor(2.0)
    path = comfy_base / "models" / "loras" / "upstream_test.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path.name


def test_upstream_lora_still_acts_on_the_trained_model(comfy, comfy_base, models):
    up = _upstream_lora(comfy_base)
    graph = training_graph(models, "upstream", upstream_lora=up, lora_file="branchgrpo/up_trained",
                           extra=predict_nodes("up_trained", ["trainer", 0]))
    assert comfy.run(graph, timeout=600)["status"]["status_str"] == "success"
    g2 = {k: graph[k] for k in ("unet", "clip", "latent")}
    g2["u"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": up,
                                                              "strength_model": 1.0}}
    g2["t"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["u", 0], "lora_name": "branchgrpo/up_trained.safetensors", "strength_model": 1.0}}
    g2["t_only"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": "branchgrpo/up_trained.safetensors", "strength_model": 1.0}}
    g2.update(predict_nodes("up_and_t", ["t", 0]))
    g2.update(predict_nodes("t_only", ["t_only", 0]))
    assert comfy.run(g2, timeout=300)["status"]["status_str"] == "success"
    trained, both, t_only = (read_latent(comfy_base, t) for t in ("up_trained", "up_and_t", "t_only"))
    assert float((trained - both).abs().max()) < 1e-5  # trained MODEL = upstream LoRA + trained LoRA
    assert float((trained - t_only).abs().max()) > 1e-3  # ... and the upstream LoRA does act


BAD_INPUTS = [
    ("split step outside the step range", dict(split_steps="0,30"), "split_steps"),
    ("K < 1", dict(branching="0"), "branching"),
    ("tree too large for the batch budget", dict(memory_budget_gb=0.0001), "too large"),
    ("empty prompt list", dict(prompts="\n  \n# only a comment"), "prompt list is empty"),
    ("eps-prediction model", dict(eps_model=True), "not a flow-matching"),
    ("LoRA name escaping the folder", dict(lora_file="../../escape"), "escapes the loras folder"),
]


@pytest.mark.parametrize("what,kwargs,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_clear_error_and_writes_nothing(comfy, comfy_base, models, what, kwargs, message):
    before = _files(comfy_base)
    graph = training_graph(models, "bad_" + re.sub(r"\W", "_", what), **kwargs)
    if "lora_file" in kwargs:  # the save node fails; make sure training never runs first
        graph["trainer"]["inputs"]["iterations"] = 1
    with pytest.raises((ComfyExecutionError, ComfyQueueError)) as err:
        comfy.run(graph, timeout=300)
    text = str(err.value) + str(getattr(err.value, "body", ""))
    assert message in text, text[-2000:]
    assert re.search(r"Branch Schedule|Trainer|Prompts|Save LoRA", text), text[-2000:]
    after = _files(comfy_base)
    new = {f for f in after - before if "bad_" in f or "escape" in f}
    assert not new, new
    assert not (comfy_base.parent / "escape.safetensors").exists()


def test_interrupt_keeps_checkpoint_and_resume_continues(comfy, comfy_base, models):
    ck = comfy_base / "output" / "branchgrpo" / "interrupted" / "checkpoint.pt"
    graph = training_graph(models, "interrupted", iterations=200, resume=True)
    pid = comfy.queue(graph)
    comfy.wait_for_message(lambda m: m.get("type") == "branchgrpo.metrics"
                           and m["data"].get("run") == "interrupted", timeout=300)
    comfy.interrupt()
    entry = comfy.wait(pid, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert comfy.messages_for(pid, "execution_interrupted")
    state = torch.load(ck, weights_only=True)
    done = int(state["iteration"])
    assert 1 <= done < 200
    graph = training_graph(models, "interrupted", iterations=done + 1, resume=True)
    entry = comfy.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "success"
    text = " ".join(entry["outputs"]["trainer"]["text"])
    assert f"{done + 1}/{done + 1} iterations (resumed from {done})" in text
    assert int(torch.load(ck, weights_only=True)["iteration"]) == done + 1
    assert not [p for p in ck.parent.iterdir() if p.name.startswith(".tmp")]


def test_training_with_a_reward_mix(comfy, comfy_base, models):
    """A Reward Mix (tiny LAION aesthetic on a tiny CLIP + a weight-free reward, advantage-sum
    aggregation) drives a training run; the per-reward means are reported."""
    import tiny_rewards as tr
    folder = comfy_base / "models" / "reward_models"
    tr.write_tiny_clip(folder / "clip-vit-large-patch14")
    tr.write_tiny_aesthetic(folder)
    common = {"dtype": "fp32", "batch_size": 8, "max_frames": 0, "temporal_weight": 0.0}
    graph = training_graph(models, "reward_mix", iterations=1, extra={
        "aes": {"class_type": "BranchGRPOAestheticLoader", "inputs": {
            "checkpoint": "sac+logos+ava1-l14-linearMSE.pth", "clip": "clip-vit-large-patch14", **common}},
        "bright": {"class_type": "BranchGRPOWeightFreeReward", "inputs": {"reward": "brightness"}},
        "mix": {"class_type": "BranchGRPORewardMix", "inputs": {
            "reward_1": ["aes", 0], "weight_1": 1.0, "reward_2": ["bright", 0], "weight_2": 0.5,
            "weight_3": 1.0, "weight_4": 1.0, "aggregation": "advantage_sum"}},
    })
    graph["trainer"]["inputs"]["reward"] = ["mix", 0]
    graph["save"]["inputs"]["filename"] = "branchgrpo/mix_lora"
    entry = comfy.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success"
    events = [m["data"] for m in comfy.messages_for(entry["prompt"][1], "branchgrpo.metrics")]
    assert len(events) == 1
    per_reward = [k for k in events[0]["metrics"] if k.startswith("reward/")]
    assert len(per_reward) == 2, events[0]["metrics"].keys()
    assert (comfy_base / "models" / "loras" / "branchgrpo" / "mix_lora.safetensors").is_file()
