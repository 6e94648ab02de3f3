"""Metrics Plot's renderer (nodes/plot.py) on synthetic histories, in a process with ComfyUI's modules:
each health panel draws its series, the evaluation reward appears only when the run has one, old runs
(no KL measurement) fall back to the KL term, and empty / flat / missing values draw without errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import procs
from comfy_server import COMFY_DIR, REPO_ROOT, VENV_PYTHON, comfy_missing_reason

SCRIPT = r'''
import importlib, json, sys, types
from pathlib import Path
REPO = Path(sys.argv[1]); sys.path.insert(0, sys.argv[2]); sys.path.append(str(REPO))
from comfy.cli_args import args
args.cpu = True
import numpy as np
pkg = types.ModuleType("branchgrpo_pack"); pkg.__path__ = [str(REPO)]; sys.modules["branchgrpo_pack"] = pkg
sub = types.ModuleType("branchgrpo_pack.nodes"); sub.__path__ = [str(REPO / "nodes")]
sys.modules["branchgrpo_pack.nodes"] = sub
P = importlib.import_module("branchgrpo_pack.nodes.plot")
cases = json.loads(Path(sys.argv[3]).read_text())
colours = {k: c for group in (P.REWARD, P.SPREAD, P.CLIP_KL, P.GRAD) for k, _, c in group}
out = {}
for name, hist in cases.items():
    img = P.render_metrics(hist, 640, 480)
    arr = (img[0].numpy() * 255).round().astype(np.uint8)
    out[name] = {"shape": list(img.shape), "min": float(img.min()), "max": float(img.max()),
                 "pixels": {k: int((arr == np.array(c, dtype=np.uint8)).all(-1).sum()) for k, c in colours.items()}}
print("RESULT" + json.dumps(out))
'''


def _history(n=12, evals=True, new=True):
    hist = []
    for i in range(1, n + 1):
        h = {"iteration": i, "reward_mean": 0.5 + 0.02 * i, "reward_max": 0.6 + 0.02 * i, "reward_min": 0.4 + 0.02 * i,
             "adv_std": 0.8944, "loss": 1e-9 * (-1) ** i, "clipfrac": 0.1 * (i % 3), "grad_norm": 0.5 + 0.1 * i,
             "kl": 0.0}
        if new:
            h.update({"reward_spread": 0.1 - 0.005 * i, "kl_ref": 1e-6 * i * i})
            if evals and (i == 1 or i % 4 == 0):
                h["eval_reward"] = 0.45 + 0.03 * i
        hist.append(h)
    return hist


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    reason = comfy_missing_reason()
    if reason:
        pytest.skip(reason)
    old = _history(new=False)
    for h in old:
        h["kl"] = 0.01 * h["iteration"]
    cases = {"new": _history(), "no_eval": _history(evals=False), "old": old, "empty": [],
             "one": _history(1), "flat_missing": [{"iteration": 1, "reward_mean": 0.5, "reward_max": 0.5,
                                                   "reward_min": 0.5, "clipfrac": None, "kl_ref": float("nan")},
                                                  {"iteration": 2, "reward_mean": 0.5, "reward_max": 0.5,
                                                   "reward_min": 0.5, "clipfrac": 0.0, "grad_norm": None}]}
    d = tmp_path_factory.mktemp("plot")
    (d / "cases.json").write_text(json.dumps(cases))
    (d / "render.py").write_text(SCRIPT)
    cmd = [str(VENV_PYTHON), str(d / "render.py"), str(REPO_ROOT), str(COMFY_DIR), str(d / "cases.json")]
    proc = procs.run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_every_health_panel_draws_its_series(rendered):
    new = rendered["new"]
    assert new["shape"] == [1, 480, 640, 3] and 0.0 <= new["min"] and new["max"] <= 1.0
    for key in ("reward_mean", "reward_max", "reward_min", "eval_reward", "reward_spread", "clipfrac", "kl_ref",
                "grad_norm"):
        assert new["pixels"][key] > 30, (key, new["pixels"])
    assert rendered["no_eval"]["pixels"]["eval_reward"] == 0  # no held-out prompts: no evaluation curve
    assert rendered["old"]["pixels"]["kl_ref"] > 30  # an older run: its KL term takes the KL line
    assert rendered["old"]["pixels"]["reward_spread"] == 0


def test_empty_single_flat_and_missing_values_draw(rendered):
    for name in ("empty", "one", "flat_missing"):
        r = rendered[name]
        assert r["shape"] == [1, 480, 640, 3] and np.isfinite(r["min"]) and r["max"] <= 1.0
    assert sum(rendered["empty"]["pixels"].values()) == 0
    assert rendered["one"]["pixels"]["reward_mean"] > 0  # a single iteration is a dot
    assert rendered["flat_missing"]["pixels"]["reward_mean"] > 0
