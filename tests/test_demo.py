"""The CPU demo (README's ``bash scripts/demo.sh``) through a real ComfyUI server.

- the embedded demo model's MODEL / CLIP / VAE work with the stock CLIPTextEncode, KSampler, VAEDecode,
  VAEEncode (and the prompt reaches the model: "red circle" gives red pictures, "green square" green ones);
  an unknown prompt fails with the list of valid prompts;
- scripts/run_demo.py's UI -> API converter turns workflows/cpu_demo.json back into exactly the graph it was
  built from (tests/cpu_demo_workflow.py), using the server's /object_info;
- a shortened demo run (run_demo.py against the fixture's server, fewer iterations) learns: the mean reward of
  the last iterations beats the first ones; it writes the LoRA into models/loras and the reward curve into
  output; and the saved LoRA, loaded with the stock LoraLoaderModelOnly, gives the same pictures as the
  Trainer's own MODEL output.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import run_demo  # noqa: E402
from comfy_server import ComfyExecutionError  # noqa: E402
import cpu_demo_workflow as W  # noqa: E402

WORKFLOW = ROOT / "workflows" / "cpu_demo.json"
# The shortened run: the shipped graph with 8 iterations instead of 24, at 5x the learning rate so that it
# gets about as far (measured, seeds 0-2: reward +33, +22, +21 between the first and last 4 iterations).
SHORT_ITERATIONS = 8
SHORT_LR = 5e-3
WINDOW = 4  # iterations averaged at each end of the run


def _images(comfy_base: Path, entry: dict, node: str) -> list[np.ndarray]:
    out = []
    for img in entry["outputs"][node]["images"]:
        rel = "/".join(p for p in (img.get("subfolder"), img["filename"]) if p)
        out.append(np.asarray(Image.open(comfy_base / img["type"] / rel).convert("RGB"), dtype=np.float32))
    return out


def _sample_graph(text: str, seed: int = 3, lora: str | None = None) -> dict:
    model = ["1", 0]
    g = {
        "1": {"class_type": "BranchGRPODemoModelLoader", "inputs": {"batch_size": 4}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "test_demo/sample"}},
    }
    if lora:
        g["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                   "strength_model": 1.0}}
        model = ["7", 0]
    g["4"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 10, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["1", 3], "denoise": 1.0}}
    return g


def test_demo_model_works_with_stock_nodes(comfy, comfy_base):
    means = {}
    for text in ("Red Circle", "green  square"):
        entry = comfy.run(_sample_graph(text), timeout=120)
        imgs = _images(comfy_base, entry, "6")
        assert len(imgs) == 4 and all(im.shape == (16, 16, 3) for im in imgs)
        means[text] = np.mean([im.reshape(-1, 3).mean(0) for im in imgs], axis=0)  # mean R, G, B
    r, g, _ = means["Red Circle"]
    assert r > g + 20, f"'red circle' is not red: mean RGB {means['Red Circle']}"
    r, g, _ = means["green  square"]
    assert g > r + 20, f"'green square' is not green: mean RGB {means['green  square']}"

    # VAE Encode -> KSampler at low denoise -> VAE Decode keeps the picture (pixel-space VAE round trip)
    g = _sample_graph("red circle")
    g["8"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}}
    g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "test_demo/roundtrip"}}
    entry = comfy.run(g, timeout=120)
    for a, b in zip(_images(comfy_base, entry, "6"), _images(comfy_base, entry, "10")):
        assert np.abs(a - b).max() <= 1.0

    with pytest.raises(ComfyExecutionError) as err:
        comfy.run(_sample_graph("a photo of a cat"), timeout=120)
    message = err.value.error_message["exception_message"]
    assert "a photo of a cat" in message and "'red circle'" in message and "'purple gradient'" in message
    assert err.value.error_message["node_type"] == "CLIPTextEncode"


def test_converter_gives_back_the_source_graph(comfy):
    got = run_demo.ui_to_api(json.loads(WORKFLOW.read_text()), comfy.object_info())

    def core(graph):
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}

    # the source gives the Trainer Settings that differ from the defaults; the workflow holds every one
    filled = core(W.API)
    given = filled[W.TRAINER_SETTINGS]["inputs"]
    extra = {k: v for k, v in got[W.TRAINER_SETTINGS]["inputs"].items() if k not in given}
    given.update(extra)
    info = comfy.object_info()["BranchGRPOTrainerSettings"]["input"]
    assert extra and all(v == info["optional"][k][1]["default"] for k, v in extra.items()), extra
    assert core(got) == filled
    assert got[W.TRAINER]["class_type"] == "BranchGRPOTrainer"


def test_short_demo_run_learns_and_writes_its_files(comfy, comfy_base, tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    code = run_demo.main(["--url", comfy.url, "--set", f"{W.TRAINER}.iterations={SHORT_ITERATIONS}",
                          "--set", f"{W.TRAINER}.learning_rate={SHORT_LR}", "--summary", str(summary_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-4000:]
    summary = json.loads(summary_path.read_text())

    # streamed: one line per iteration, and the paths at the end
    assert len(re.findall(r"iteration \d+/%d: reward mean" % SHORT_ITERATIONS, printed)) == SHORT_ITERATIONS
    assert "LoRA:" in printed and "cpu_demo_reward_curve" in printed

    # learning: the reward of the last iterations beats the first ones
    rewards = [m["reward_mean"] for m in summary["metrics"]]
    assert len(rewards) == SHORT_ITERATIONS
    first, last = np.mean(rewards[:WINDOW]), np.mean(rewards[-WINDOW:])
    assert last > first, f"no learning: first {WINDOW} {first:.4f}, last {WINDOW} {last:.4f}: {rewards}"

    # the stock KSampler, same seed and prompt: the trained model scores higher than the base model
    scores = {v["title"]: float(re.search(r"mean: (-?[0-9.]+)", v["text"][0]).group(1))
              for v in summary["texts"].values() if v["title"].startswith("Score ")}
    assert scores["Score AFTER"] > scores["Score BEFORE"], scores

    # files: the LoRA in models/loras, the curve and the before/after picture in output
    lora = comfy_base / "models" / "loras" / f"{W.LORA_NAME}.safetensors"
    assert lora.is_file() and [x["path"] for x in summary["loras"]] == [str(lora)]
    curves = [Path(x["path"]) for x in summary["images"] if "reward_curve" in x["path"]]
    assert len(curves) == 1 and curves[0].is_file()
    assert curves[0].is_relative_to(comfy_base / "output")
    assert Image.open(curves[0]).size == (768, 512)
    before_after = [Path(x["path"]) for x in summary["images"] if "before_after" in x["path"]]
    assert len(before_after) == 4 and all(Image.open(p).size == ((2 * 16 + 2) * 8, 16 * 8) for p in before_after)

    # the saved LoRA through the stock LoraLoaderModelOnly = the Trainer's MODEL output (same seed and prompt)
    ks = W.API["12"]["inputs"]
    entry = comfy.run(_sample_graph(W.TEST_PROMPT, seed=ks["seed"], lora=f"{W.LORA_NAME}.safetensors"), timeout=120)
    with_loader = _images(comfy_base, entry, "6")
    for i, (im, pair) in enumerate(zip(with_loader, before_after)):
        after = np.asarray(Image.open(pair).convert("RGB"), dtype=np.float32)[:, (16 + 2) * 8:][::8, ::8]
        assert np.abs(after - im).max() <= 2.0, f"sample {i}: the stock LoRA loader and the Trainer's MODEL differ"
    assert "lora key not loaded" not in comfy.server.log_tail(200_000)
