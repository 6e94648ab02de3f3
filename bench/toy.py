"""The toy alignment benchmark: every preset on one pre-trained toy DiT, side by side.

    python -m bench.toy --out results.json            # full: all presets, 3 seeds
    python -m bench.toy --out quick.json --quick      # under 2 minutes
    python -m bench.toy --race --out bench/race.json  # every preset on the same clock (bench/race.py)
    python -m bench.toy --race --quick --out q.json   # three presets, one seed, under 3 minutes

For each preset and seed: a fresh LoRA on the pre-trained toy flow transformer (bench/pretrain.py),
trained against DDPO's JPEG-compressibility reward for a fixed number of iterations with the same
optimiser settings, prompts per iteration and batch limits for every preset. Reported per preset:
rollout model evaluations per leaf, trained edges per leaf, seconds per iteration (median over
iterations, mean over seeds), and the mean reward of a fixed evaluation set (deterministic ODE
samples of every prompt from fixed noise) before and after training. Presets run interleaved
(seed by seed), so machine noise hits them alike; ratios are to ``dancegrpo`` measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from branchgrpo import BranchGRPOTrainer, preset
from branchgrpo.lora import LoRAConfig
from branchgrpo.models.toy_dit import CLASS_NAMES
from branchgrpo.peft_adapter import PeftAdapter
from branchgrpo.rewards.weight_free import JpegCompressibility
from branchgrpo.sde import sigma_schedule
from demo.pretrain import load_velocity_model

PRESET_ORDER = ("dancegrpo", "dancegrpo-tf0.6", "mixgrpo", "flowgrpo", "branchgrpo", "branchgrpo-deppru",
                "branchgrpo-widpru", "branchgrpo-mix")
QUICK_PRESETS = ("dancegrpo", "branchgrpo", "branchgrpo-deppru", "branchgrpo-mix")


@torch.no_grad()
def evaluate(model, reward, per_prompt: int = 4, steps: int = 20, shift: float = 3.0, seed: int = 1234) -> float:
    """Mean reward of deterministic (ODE) samples of every prompt from fixed noise."""
    prompts = [p for p in CLASS_NAMES for _ in range(per_prompt)]
    cond = model.encode(list(CLASS_NAMES))
    index = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_prompt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), *model.latent_shape), generator=g)
    sig = sigma_schedule(steps, shift).float()
    for i in range(steps):
        v = model.velocity(x, sig[i].expand(x.shape[0]), cond, index)
        x = x + (sig[i + 1] - sig[i]) * v
    return float(reward(model.decode(x), prompts).mean())


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Gradient checkpointing of every block of the model's block lists while gradients are on (the
    memory regime FLUX-size training runs in: the backward pays one extra forward)."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                orig = block.forward

                def forward(*a, __orig=orig, **kw):
                    if torch.is_grad_enabled():
                        return torch.utils.checkpoint.checkpoint(__orig, *a, use_reentrant=False, **kw)
                    return __orig(*a, **kw)

                block.forward = forward
                n += 1
    return n


def run_one(base_model, name: str, seed: int, iterations: int, args) -> dict:
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    if args.gradient_checkpointing:
        checkpoint_blocks(model)
    lora = PeftAdapter(model, LoRAConfig(rank=args.rank, alpha=args.rank, targets=("*.attn.*", "*.mlp.*")), seed=seed)
    reward = JpegCompressibility()
    cfg = preset(name, iterations=iterations, prompts_per_iteration=args.prompts, seed=seed,
                 max_batch=args.max_batch)
    cfg.optim.learning_rate = args.lr
    cfg.optim.max_train_batch = args.max_train_batch
    cfg.optim.edges_per_step = args.edges_per_step
    cfg.optim.kl_beta = 0.0  # every preset optimises the same objective here
    before = evaluate(model, reward)
    trainer = BranchGRPOTrainer(model, lora, list(CLASS_NAMES), [reward], model.decode, cfg, model.latent_shape)
    hist = trainer.train()
    after = evaluate(model, reward)
    leaves = hist[0]["leaves"]
    times = [h["time_total"] for h in hist[1:]] or [hist[0]["time_total"]]
    return {
        "rollout_nfe_per_leaf": statistics.mean(h["nfe_rollout"] for h in hist) / leaves,
        "trained_edges_per_leaf": statistics.mean(h["edges_trained"] for h in hist) / leaves,
        "train_forwards_per_leaf": statistics.mean(h["nfe_train"] for h in hist) / leaves,
        "sec_per_iter": statistics.median(times),
        "reward_before": before, "reward_after": after,
        "train_reward_first": hist[0]["reward_mean"], "train_reward_last": hist[-1]["reward_mean"],
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, rs in runs.items():
        agg = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        gains = [r["reward_after"] - r["reward_before"] for r in rs]
        agg["reward_gain"] = statistics.mean(gains)
        agg["reward_gain_std"] = statistics.stdev(gains) if len(gains) > 1 else 0.0
        agg["seeds"] = len(rs)
        out[name] = agg
    return out


def table(presets: dict) -> str:
    ref = presets.get("dancegrpo")
    head = (f"{'preset':20s} {'NFE/leaf':>8s} {'edges/leaf':>10s} {'s/iter':>7s} {'x dance':>7s} "
            f"{'before':>8s} {'after':>8s} {'gain':>7s} {'gain x dance':>12s}")
    lines = [head, "-" * len(head)]
    for name, p in presets.items():
        t_ratio = p["sec_per_iter"] / ref["sec_per_iter"] if ref else float("nan")
        g_ratio = p["reward_gain"] / ref["reward_gain"] if ref and ref["reward_gain"] != 0 else float("nan")
        lines.append(f"{name:20s} {p['rollout_nfe_per_leaf']:8.3f} {p['trained_edges_per_leaf']:10.3f} "
                     f"{p['sec_per_iter']:7.2f} {t_ratio:7.2f} {p['reward_before']:8.3f} {p['reward_after']:8.3f} "
                     f"{p['reward_gain']:7.3f} {g_ratio:12.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    ap.add_argument("--presets", default="", help="comma-separated subset of presets")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None, help="prompts (trees) per iteration (default 2; race 1)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--edges-per-step", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-train-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    race = ap.add_argument_group("the race (--race): every preset on the same wall-clock budget")
    race.add_argument("--race", action="store_true", help="race the presets to the reward (bench/race.py)")
    race.add_argument("--budget", type=float, default=None, help="training seconds per run (race; default 60, quick 6)")
    race.add_argument("--evals", type=int, default=None, help="evaluations per run, evenly spaced (default 4, quick 3)")
    race.add_argument("--eval-seeds", type=int, default=4, help="ODE samples per held-out prompt")
    race.add_argument("--eval-steps", type=int, default=10, help="Euler steps of the evaluation sampler")
    race.add_argument("--reward", default="colorfulness",
                      help="colorfulness (default), jpeg_compressibility, brightness, saturation or contrast")
    race.add_argument("--png", default="", help="curve image (default: --out with .png)")
    race.add_argument("--from-json", default="", help="re-summarise the runs saved in a race's JSON (no training)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="checkpoint every transformer block in the update: the regime FLUX-size training runs in "
                         "(and the Trainer's default for models over 1 GB); --no-gradient-checkpointing turns it off")
    args = ap.parse_args(argv)
    args.prompts_set = args.prompts is not None
    if args.prompts is None:
        args.prompts = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.race:
        threads = torch.get_num_threads()
        if not args.threads:  # one thread: on a shared CPU two threads of a small model mostly wait on each other
            torch.set_num_threads(1)
        from bench import race
        args.budget = args.budget or (6.0 if args.quick else 60.0)
        args.evals = args.evals or (3 if args.quick else 4)
        if args.prompts_set is False:
            args.prompts = 1
        if args.quick:
            args.eval_seeds = min(args.eval_seeds, 4)
        try:
            return race.run(args)
        finally:
            torch.set_num_threads(threads)  # called from a test, leave the process as it was
    names = tuple(n for n in args.presets.split(",") if n) or (QUICK_PRESETS if args.quick else PRESET_ORDER)
    iterations = args.iterations or (3 if args.quick else 20)
    seeds = args.seeds or (1 if args.quick else 3)
    if "dancegrpo" not in names:
        names = ("dancegrpo",) + names
    base = load_velocity_model()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.time()
    for seed in range(seeds):
        for name in names:
            r = run_one(base, name, seed, iterations, args)
            runs[name].append(r)
            print(f"[seed {seed}] {name:20s} {r['sec_per_iter']:.2f} s/iter  reward {r['reward_before']:.3f} -> "
                  f"{r['reward_after']:.3f}", flush=True)
    presets = summarise(runs)
    result = {"presets": presets, "iterations": iterations, "prompts_per_iteration": args.prompts,
              "lr": args.lr, "rank": args.rank, "edges_per_step": args.edges_per_step,
              "torch_threads": torch.get_num_threads(), "wall_seconds": time.time() - t0,
              "gradient_checkpointing": args.gradient_checkpointing,
              "reward": "jpeg_compressibility"}
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, args.out)
    print(table(presets))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
