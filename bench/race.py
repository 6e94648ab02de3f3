"""The race to the reward: every preset on the same clock (``python -m bench.toy --race``).

Every preset trains the same pre-trained toy DiT (``demo/tiny_t2i.safetensors``) with the same LoRA
(rank 8 on the attention and MLP layers, seeded by the run's seed), the same reward, learning rate,
prompts per iteration and batch limits, for the same budget of training seconds; presets run
interleaved seed by seed, so machine noise hits them alike. The training clock stops during
evaluations. Every ``budget / evals`` training seconds the run is evaluated the same way for every
method: the reward of Euler-ODE samples (``--eval-steps``, no SDE noise) of held-out prompts (classes
never trained on) from fixed seeds. So an SDE method is not judged by its own noisy rollouts.

Per preset: the time to reach ``dancegrpo``'s final evaluation reward (mean over seeds), as a ratio to
``dancegrpo``'s own time (both read on the seed-mean curve); the final reward and its std over seeds;
the model evaluations spent (rollout + update, per run, mean over seeds); and the drift: the mean RMS
distance of the final evaluation samples from the base model's at the same seeds, so that a method that
wins by hacking the reward shows it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from branchgrpo import BranchGRPOTrainer, BranchSchedule, preset
from branchgrpo.evaluate import EvalParts, evaluate
from branchgrpo.fileio import atomic_write
from branchgrpo.lora import LoRAConfig
from branchgrpo.models.toy_dit import CLASS_NAMES, ToyDiT, ToyDiTConfig, ToyVelocityModel
from branchgrpo.peft_adapter import PeftAdapter

RACE_PRESETS = ("dancegrpo", "branchgrpo", "branchgrpo-mix", "tempflow-grpo", "flowgrpo-fast", "diffusionnft",
                "awm", "dgpo", "branch-nft", "branch-awm")
QUICK_RACE = ("dancegrpo", "branch-nft", "diffusionnft")
HELDOUT = ("cyan stripes", "purple gradient")
DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo" / "tiny_t2i.safetensors"


def load_demo_model() -> ToyVelocityModel:
    """The pack's pre-trained toy DiT (the CPU demo's weights, fp16 on disk), in float32."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(DEMO_MODEL), "pt") as fh:
        config = ToyDiTConfig.from_dict(json.loads(fh.metadata()["model_config"]))
    net = ToyDiT(config)
    net.load_state_dict({k: v.float() for k, v in load_file(str(DEMO_MODEL)).items()})
    return ToyVelocityModel(net.eval())


def make_reward(name: str):
    from branchgrpo.rewards import weight_free as wf
    table = {"colorfulness": wf.Colorfulness, "jpeg_compressibility": wf.JpegCompressibility,
             "brightness": lambda: wf.Brightness(target=1.0), "saturation": wf.Saturation, "contrast": wf.Contrast}
    if name not in table:
        raise ValueError(f"--reward: unknown reward {name!r}; choose one of {sorted(table)}")
    return table[name]()


def shrink(cfg: Any) -> Any:
    """``--quick``: each preset's method on an 8-step schedule with 4 samples per prompt (checks the
    machinery in seconds; its numbers say nothing about the methods)."""
    s = cfg.schedule
    if s.branch_step_range is not None:
        s.num_steps, s.branching, s.branch_step_range = 8, 4, (0, 5)
    elif s.split_steps:
        s.num_steps, s.split_steps, s.branching = 8, (0, 2), 2
    else:
        s.num_steps, s.group_size = 8, 4
        if s.sde_window is not None and s.sde_window[1] > 0:
            s.sde_window = (0, 2)
            s.sde_window_range = (0, 4) if s.sde_window_range is not None else None
    cfg.objective.train_timesteps = min(cfg.objective.train_timesteps, 3)
    return cfg


def eval_parts(model: ToyVelocityModel, reward, steps: int) -> EvalParts:
    return EvalParts(model=model, decode=model.decode, rewards=[reward],
                     schedule=BranchSchedule(num_steps=steps, split_steps=(), shift=3.0),
                     latent_shape=model.latent_shape, max_batch=64)


def race_one(base: ToyVelocityModel, name: str, seed: int, args: Any, base_x0: torch.Tensor,
             base_reward: float) -> dict:
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    lora = PeftAdapter(model, LoRAConfig(rank=args.rank, alpha=args.rank, targets=("*.attn.*", "*.mlp.*")), seed=seed)
    reward = make_reward(args.reward)
    cfg = preset(name, iterations=10 ** 6, prompts_per_iteration=args.prompts, seed=seed, max_batch=args.max_batch)
    if args.quick:
        shrink(cfg)
    cfg.optim.learning_rate = args.lr
    cfg.optim.max_train_batch = args.max_train_batch
    cfg.optim.kl_beta = 0.0  # every preset optimises the same objective: the reward, no KL to the base
    cfg.objective.kl_beta = 0.0
    if hasattr(cfg, "kl_metric_parents"):
        cfg.kl_metric_parents = 0  # monitoring off: the clock measures training only
    train_prompts = [c for c in CLASS_NAMES if c not in HELDOUT]
    trainer = BranchGRPOTrainer(model, lora, train_prompts, [reward], model.decode, cfg, model.latent_shape)
    parts = eval_parts(model, reward, args.eval_steps)
    seeds = range(args.eval_seeds)
    interval = args.budget / args.evals
    curve = [{"seconds": 0.0, "reward": base_reward, "model_evaluations": 0, "iterations": 0}]
    clock, nfe, next_eval, res = 0.0, 0, interval, None
    while clock < args.budget:
        t0 = time.perf_counter()
        m = trainer.step()
        clock += time.perf_counter() - t0
        nfe += int(m["nfe_rollout"]) + int(m["nfe_train"])
        if clock >= next_eval or clock >= args.budget:
            res = evaluate(parts, HELDOUT, seeds)
            curve.append({"seconds": clock, "reward": res["reward"], "model_evaluations": nfe,
                          "iterations": trainer.iteration})
            while next_eval <= clock:
                next_eval += interval
    drift = float(((res["x0"] - base_x0) ** 2).flatten(1).mean(1).sqrt().mean())
    return {"curve": curve, "final_reward": curve[-1]["reward"], "model_evaluations": nfe, "drift": drift,
            "iterations": trainer.iteration, "train_seconds": clock,
            "optimizer_steps": sum(int(h["optimizer_steps"]) for h in trainer.history)}


def on_grid(curve: Sequence[dict], budget: float, evals: int) -> list[dict]:
    """The run's evaluation at each grid time ``k * budget / evals`` (k = 0..evals): the first one made at
    or after it. An iteration longer than the interval crosses two grid times at once, and both read the
    evaluation made after it; the last grid time reads the final evaluation."""
    out = []
    for k in range(evals + 1):
        g = budget * k / evals
        out.append(next((p for p in curve if p["seconds"] >= g - 1e-9), curve[-1]))
    return out


def mean_curve(runs: Sequence[dict], budget: float, evals: int) -> list[tuple[float, float, float]]:
    """``(seconds, mean reward, std reward)`` over seeds at each grid time; the seconds are the mean training
    clock of the evaluations read there."""
    grids = [on_grid(r["curve"], budget, evals) for r in runs]
    out = []
    for k in range(evals + 1):
        ts = [g[k]["seconds"] for g in grids]
        rs = [g[k]["reward"] for g in grids]
        out.append((statistics.mean(ts), statistics.mean(rs), statistics.stdev(rs) if len(rs) > 1 else 0.0))
    return out


def time_to(curve: list[tuple[float, float, float]], target: float) -> float | None:
    for t, r, _ in curve[1:]:
        if r >= target:
            return t
    return None


def summarise(runs: dict[str, list[dict]], budget: float, evals: int) -> dict:
    curves = {name: mean_curve(rs, budget, evals) for name, rs in runs.items()}
    dance = runs["dancegrpo"]
    target = statistics.mean(r["final_reward"] for r in dance)
    t_dance = time_to(curves["dancegrpo"], target)
    race = {}
    for name, rs in runs.items():
        finals = [r["final_reward"] for r in rs]
        t = time_to(curves[name], target)
        race[name] = {
            "time_to_target_ratio": (t / t_dance) if (t is not None and t_dance) else None,
            "time_to_target_seconds": t,
            "final_reward": statistics.mean(finals),
            "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "model_evaluations": statistics.mean(r["model_evaluations"] for r in rs),
            "drift": statistics.mean(r["drift"] for r in rs),
            "iterations": statistics.mean(r["iterations"] for r in rs),
            "optimizer_steps": statistics.mean(r["optimizer_steps"] for r in rs),
            "seeds": len(rs),
            "curve": [{"seconds": t_, "reward": r_, "reward_std": s_} for t_, r_, s_ in curves[name]],
        }
    return {"target": {"preset": "dancegrpo", "reward": target, "seconds": t_dance}, "race": race}


# ------------------------------------------------------------------------------------ the plot ---
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 60, 160),
           (200, 150, 0), (0, 110, 90)]


def plot(result: dict, path: str | os.PathLike, title: str) -> None:
    """Reward against training seconds, one line per preset, a band of +-1 std over seeds (PNG, PIL only)."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 1100, 640, 80, 260, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    race = result["race"]
    pts = [(p["seconds"], p["reward"], p["reward_std"]) for v in race.values() for p in v["curve"]]
    t_max = max(p[0] for p in pts) or 1.0
    lo = min(p[1] - p[2] for p in pts)
    hi = max(p[1] + p[2] for p in pts)
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(t: float, r: float) -> tuple[float, float]:
        return L + (W - L - R) * t / t_max, T + (H - T - B) * (hi - r) / (hi - lo)

    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    for k in range(6):
        r = lo + (hi - lo) * k / 5
        y = xy(0, r)[1]
        d.line([L - 4, y, W - R, y], fill=(225, 225, 225))
        d.text((6, y - 6), f"{r:.4g}", fill=(0, 0, 0))
        t = t_max * k / 5
        x = xy(t, lo)[0]
        d.text((x - 10, H - B + 6), f"{t:.0f}", fill=(0, 0, 0))
    d.text(((W - R + L) // 2 - 60, H - 24), "training seconds", fill=(0, 0, 0))
    d.text((L, 12), title, fill=(0, 0, 0))
    target = result["target"]["reward"]
    ty = xy(0, target)[1]
    d.line([L, ty, W - R, ty], fill=(120, 120, 120), width=1)
    d.text((L + 6, ty - 14), "dancegrpo's final reward (the target)", fill=(90, 90, 90))
    for i, (name, v) in enumerate(race.items()):
        col = PALETTE[i % len(PALETTE)]
        c = v["curve"]
        upper = [xy(p["seconds"], p["reward"] + p["reward_std"]) for p in c]
        lower = [xy(p["seconds"], p["reward"] - p["reward_std"]) for p in reversed(c)]
        if len(c) > 1:
            d.polygon(upper + lower, fill=col + (40,))
            d.line([xy(p["seconds"], p["reward"]) for p in c], fill=col + (255,), width=2)
        ly = T + 6 + 18 * i
        d.line([W - R + 10, ly + 6, W - R + 34, ly + 6], fill=col, width=3)
        ratio = v["time_to_target_ratio"]
        d.text((W - R + 40, ly), f"{name} ({'-' if ratio is None else f'{ratio:.2f}x'})", fill=(0, 0, 0))
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def table(result: dict) -> str:
    head = (f"{'preset':16s} {'t/t_dance':>9s} {'final reward':>20s} {'model evals':>11s} {'drift':>7s} "
            f"{'iters':>6s}")
    lines = [head, "-" * len(head)]
    for name, v in result["race"].items():
        ratio = "never" if v["time_to_target_ratio"] is None else f"{v['time_to_target_ratio']:.2f}"
        lines.append(f"{name:16s} {ratio:>9s} {v['final_reward']:10.4f} +- {v['final_reward_std']:6.4f} "
                     f"{v['model_evaluations']:11.0f} {v['drift']:7.4f} {v['iterations']:6.1f}")
    lines.append(f"target: dancegrpo's final reward {result['target']['reward']:.4f}")
    return "\n".join(lines)


def run(args: Any) -> int:
    if getattr(args, "from_json", ""):
        return resummarise(args)
    names = tuple(n for n in args.presets.split(",") if n) or (QUICK_RACE if args.quick else RACE_PRESETS)
    if "dancegrpo" not in names:
        names = ("dancegrpo",) + names
    unknown = [n for n in names if n not in __import__("branchgrpo.presets", fromlist=["PRESETS"]).PRESETS]
    if unknown:
        raise SystemExit(f"--presets: unknown preset(s) {unknown}")
    seeds = args.seeds or (1 if args.quick else 3)
    base = load_demo_model()
    reward = make_reward(args.reward)
    with torch.no_grad():
        ref = evaluate(eval_parts(base, reward, args.eval_steps), HELDOUT, range(args.eval_seeds))
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_start = time.time()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(seeds):
        for name in names:
            r = race_one(base, name, seed, args, ref["x0"], ref["reward"])
            runs[name].append(r)
            print(f"[seed {seed}] {name:16s} {r['iterations']:3d} it  reward {ref['reward']:.4f} -> "
                  f"{r['final_reward']:.4f}  NFE {r['model_evaluations']}  drift {r['drift']:.4f}", flush=True)
    result = summarise(runs, args.budget, args.evals)
    result.update({
        "budget_seconds": args.budget, "evaluations_per_run": args.evals, "seeds": seeds,
        "reward": args.reward, "base_reward": ref["reward"], "heldout_prompts": list(HELDOUT),
        "eval_seeds": args.eval_seeds, "eval_steps": args.eval_steps, "prompts_per_iteration": args.prompts,
        "lr": args.lr, "rank": args.rank, "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.time() - t_start,
        "load_average_start": load0,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "runs": {n: [{k: v for k, v in r.items()} for r in rs] for n, rs in runs.items()},
    })
    write(result, args)
    print(f"({time.time() - t_start:.0f} s)")
    return 0


def write(result: dict, args: Any) -> None:
    atomic_write(args.out, lambda fh: fh.write(json.dumps(result, indent=2).encode()))
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    plot(result, png, f"held-out {result['reward']} (ODE, {result['eval_seeds']} seeds x "
                      f"{len(result['heldout_prompts'])} prompts) vs training seconds; {result['seeds']} seed(s), "
                      "band = +-1 std")
    print(table(result))
    print(f"wrote {args.out} and {png}")


def resummarise(args: Any) -> int:
    """``--from-json FILE``: the table, JSON and PNG again from the runs a race saved (no training)."""
    with open(args.from_json) as fh:
        old = json.load(fh)
    result = summarise(old["runs"], old["budget_seconds"], old["evaluations_per_run"])
    result.update({k: v for k, v in old.items() if k not in ("target", "race")})
    write(result, args)
    return 0
