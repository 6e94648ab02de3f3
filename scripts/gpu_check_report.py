"""The GPU check's own measurements and its summary (called by scripts/gpu_check.sh).

    gpu_check_report.py environment --out F      Python, torch, the device, and every module ComfyUI 0.33.0 imports
    gpu_check_report.py adapters --summary S --log L --out F
                                                 did the trained LoRA move (the weight wrappers acted), and through
                                                 which model patcher (the Trainer's log line)
    gpu_check_report.py budget --url U --out F   the demo's graph with memory_budget_gb forced to 0.01 GiB: refused,
                                                 before any iteration, naming the field
    gpu_check_report.py summary --out DIR        one table of what the check found, from the files above
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what ComfyUI 0.33.0 and the pack import, by module name (distribution in brackets where it differs)
MODULES = ["torch", "torchvision", "torchaudio", "torchsde", "av", "sqlalchemy", "alembic", "comfy_kitchen",
           "comfy_aimdo", "simpleeval", "blake3", "pydantic", "pydantic_settings", "tomli_w", "transformers",
           "tokenizers", "sentencepiece", "safetensors", "aiohttp", "yarl", "yaml", "PIL", "scipy", "tqdm",
           "psutil", "einops", "requests", "filelock", "numpy", "websocket"]


def write(path: str, data: dict) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(p)


def environment(args) -> int:
    import torch
    out = {"python": platform.python_version(), "executable": sys.executable, "modules": {}, "missing": []}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            out["modules"][name] = {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}
        except Exception as e:  # noqa: BLE001 (recorded)
            out["missing"].append(f"{name}: {type(e).__name__}: {e}")
    out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["device"] = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                         "free_bytes": free, "total_bytes": total}
    try:
        import comfy_kitchen
        reg = comfy_kitchen.registry
        out["comfy_kitchen_backends"] = {n: bool(reg.is_available(n)) for n in ("cuda", "triton", "eager", "hip")}
    except Exception as e:  # noqa: BLE001
        out["comfy_kitchen_backends"] = f"{type(e).__name__}: {e}"
    write(args.out, out)
    print(f"python {out['python']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"device {out.get('device', {}).get('name', 'cpu')}; missing: {out['missing'] or 'none'}")
    return 1 if out["missing"] else 0


def adapters(args) -> int:
    """The demo's LoRA: every adapter pair's B ("up") starts at zero, so a nonzero one means gradients reached it
    through the weight wrappers in the server's patcher, and the before/after scores."""
    from safetensors import safe_open
    summary = json.loads(Path(args.summary).read_text())
    path = summary["loras"][0]["path"]
    ups, moved = 0, 0
    with safe_open(path, "pt") as f:
        for k in f.keys():
            if k.endswith("lora_up.weight") or k.endswith(".lora_B.weight"):
                ups += 1
                moved += int(f.get_tensor(k).float().abs().max().item() > 0)
    log = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
    m = re.findall(r"training on (\S+), model patcher (\w+), (\w+) adapter on (\d+) layers", log)
    scores = {t["title"]: t["text"] for t in summary.get("texts", {}).values() if "Score" in (t["title"] or "")}
    out = {"lora": path, "up_tensors": ups, "up_tensors_moved": moved, "trainer_log": m[0] if m else None,
           "patcher": m[0][1] if m else None, "device": m[0][0] if m else None, "scores": scores,
           "reward": summary.get("reward")}
    write(args.out, out)
    print(f"LoRA {Path(path).name}: {moved}/{ups} up tensors moved; trained on {out['device']} through "
          f"{out['patcher']}")
    return 0 if ups and moved == ups and m else 1


def budget(args) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_demo
    _, info = run_demo.http(args.url + "/object_info", timeout=120)
    prompt = run_demo.ui_to_api(json.loads((ROOT / "workflows" / "cpu_demo.json").read_text()), info)
    run_demo.apply_overrides(prompt, ['20.memory_budget_gb=0.01', '5.run_name="cpu_demo_budget"'])
    runner = run_demo.Runner(args.url, prompt, quiet=True)
    t0 = time.monotonic()
    message = None
    try:
        runner.run(timeout=120)
    except RuntimeError as e:
        message = str(e)
    seconds = time.monotonic() - t0
    refused = bool(message) and "memory_budget_gb" in message
    out = {"refused": refused, "seconds": seconds, "iterations_run": len(runner.metrics),
           "message": (message or "").split("\n")[0][:2000]}
    write(args.out, out)
    print(f"budget 0.01 GiB: {'refused' if refused else 'NOT refused'} in {seconds:.1f} s after "
          f"{len(runner.metrics)} iterations: {out['message'][:300]}")
    return 0 if refused and not runner.metrics else 1


def summary(args) -> int:
    d = Path(args.out)

    def load(name):
        p = d / name
        return json.loads(p.read_text()) if p.is_file() else None

    gib = 2 ** 30
    lines = []
    steps = load("steps.json") or {}
    lines.append("steps: " + ", ".join(f"{k} {v['exit_code']} ({v['seconds']} s)" for k, v in steps.items()))
    env = load("environment.json")
    if env:
        lines.append(f"python {env['python']}, torch {env['torch']['version']}, device "
                     f"{(env.get('device') or {}).get('name', 'cpu')}, comfy-kitchen {env.get('comfy_kitchen_backends')}")
    for name in ("demo_summary.json", "continued_summary.json"):
        s = load(name)
        if s and s.get("reward"):
            r = s["reward"]
            lines.append(f"{name}: reward {r['first']:.4f} -> {r['last']:.4f} over {r['iterations']} iterations, "
                         f"{s.get('seconds', 0):.0f} s")
    a = load("adapters.json")
    if a:
        lines.append(f"adapters: {a['up_tensors_moved']}/{a['up_tensors']} moved, patcher {a['patcher']} on {a['device']}")
    b = load("budget.json")
    if b:
        lines.append(f"budget: refused={b['refused']} in {b['seconds']:.1f} s, iterations {b['iterations_run']}")
    for name in ("fp8.json", "ratios.json"):
        s = load(name)
        if not s:
            continue
        for run in s.get("runs", []):
            lines.append(f"{name} {run['preset']} {run['weight_dtype']}: {run['seconds_per_iteration']} s/it, peak "
                         f"measured {run['peak_bytes_measured'] / gib:.2f} GiB, predicted "
                         f"{run['peak_bytes_predicted'] / gib:.2f} GiB ({run['prediction_error']:+.1%})")
            for phase, t in (run.get("transients") or {}).items():
                meas = t["measured"][-1] if t["measured"] else None
                if meas is not None:
                    lines.append(f"    {phase}: transient predicted {t['predicted'] / gib:.2f} GiB, measured "
                                 f"{meas / gib:.2f} GiB" + (f" ({t['error'][-1]:+.1%})" if t["error"][-1] is not None
                                                            else ""))
            for r_i, rnd in enumerate((run.get("instrument") or {}).get("rounds") or []):
                for phase, v in rnd.items():
                    if "free_before" in v:
                        lines.append(f"    iteration {r_i + 1} {phase}: free {v['free_before'] / gib:.2f} -> "
                                     f"{v['free_after'] / gib:.2f} GiB, reserved {v['reserved'] / gib:.2f} GiB")
            for phase, v in ((run.get("measured") or {}).get("phases") or {}).items():
                if isinstance(v, dict) and "allocated" in v:
                    lines.append(f"    {phase}: allocated {v['allocated'] / gib:.2f} GiB, reserved "
                                 f"{v['reserved'] / gib:.2f} GiB" + (f", free after {v['free_after'] / gib:.2f} GiB"
                                                                     if v.get("free_after") is not None else ""))
        for preset, r in ((s.get("ratios") or {}).get("presets") or {}).items():
            lines.append(f"{name} ratio {preset}: {r['ratio']:.3f} x dancegrpo ({r['seconds_per_iteration']:.2f} s/it)")
    text = "\n".join(lines)
    (d / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("environment")
    e.add_argument("--out", required=True)
    a = sub.add_parser("adapters")
    a.add_argument("--summary", required=True)
    a.add_argument("--log", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("budget")
    b.add_argument("--url", required=True)
    b.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return {"environment": environment, "adapters": adapters, "budget": budget, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
