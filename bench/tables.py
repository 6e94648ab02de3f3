"""The README's tables and figures, rendered from the JSON files the benchmarks wrote (standard library only).

``scripts/readme_tables.py`` writes each between the README's ``<!-- generated: NAME ... -->`` and
``<!-- end generated -->`` lines; ``tests/test_readme_tables.py`` fails when one differs from its file.

=================  ============================  ==================================================================
NAME               file                          written by
=================  ============================  ==================================================================
memory-table       bench/memory_table.json       ``python -m bench.scale --table --prompts 1 --out ...``
memory-fits        bench/memory_table.json       the same
memory-check       bench/transients.json         ``python -m bench.scale --transients ... --out ...`` (the command
                                                 is in the file's ``shape``)
transients-table   bench/transients.json         the same
transients-256     bench/transients_256.json     the same at 256 px and 64 text tokens (FLUX.1-dev)
demo               bench/demo_summary.json       ``python scripts/run_demo.py --summary bench/demo_summary.json``
=================  ============================  ==================================================================
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 2 ** 30, 2 ** 20
NAMES = {"flux-dev": "FLUX.1-dev", "sd35-large": "SD3.5 Large", "sd35-medium": "SD3.5 Medium",
         "wan21-14b": "Wan 2.1 14B", "wan21-1.3b": "Wan 2.1 1.3B"}
SOURCES = {"memory-table": "bench/memory_table.json", "memory-fits": "bench/memory_table.json",
           "memory-check": "bench/transients.json",
           "transients-table": "bench/transients.json", "transients-256": "bench/transients_256.json",
           "demo": "bench/demo_summary.json"}


def load(name: str, root: Path = ROOT) -> dict:
    return json.loads((root / SOURCES[name]).read_text())


def memory_table(rows: list[dict]) -> str:
    """``bench.scale --table``: one row per family, size, base dtype and checkpointing (GiB)."""
    out = ["| model | size | base | ckpt | CFG | batch / train batch | weights | encoders | update activations | "
           "peak (phase) | needs | fits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r["resolution"]
        size = f"{res}²" if isinstance(res, int) else f"{res[0]}p×{r['frames']}"
        up = r["phases"]["update"]
        fits = ", ".join(f"{c}" for c in r["fits_gb"]) + " GiB" if r["fits_gb"] else "none of 24/48/80 GiB"
        out.append(f"| {NAMES[r['family']]} | {size} | {r['weight_dtype']} | {'on' if r['checkpointing'] else 'off'} "
                   f"| {r['cfg']:g} | {r['max_batch']} / {r['max_train_batch']} | {up['weights'] / GIB:.1f} | "
                   f"{r['phases']['encode']['text_encoders'] / GIB:.1f} | {up['transient'] / GIB:.1f} | "
                   f"{r['peak_bytes'] / GIB:.1f} ({r['peak_phase']}) | {r['needs_bytes'] / GIB:.1f} | {fits} |")
    return "\n".join(out)


def memory_fits(rows: list[dict]) -> str:
    """For each model and size: the smallest card a row with checkpointing fits, and with which base."""
    out = []
    groups: dict = {}
    for r in rows:
        if r["checkpointing"]:
            res = r["resolution"]
            size = f"{res}²" if isinstance(res, int) else f"{res[0]}p×{r['frames']}"
            groups.setdefault((NAMES[r["family"]], size), []).append(r)
    for (name, size), rs in groups.items():
        fitting = [(min(r["fits_gb"]), r["weight_dtype"] != "bf16", r) for r in rs if r["fits_gb"]]
        if not fitting:
            out.append(f"* {name} at {size}: no card of 24/48/80 GiB.")
            continue
        card, _, r = min(fitting, key=lambda t: (t[0], t[1]))
        out.append(f"* {name} at {size}: {card} GiB, with a{'n' if r['weight_dtype'] == 'fp8' else ''} "
                   f"{r['weight_dtype']} base (needs {r['needs_bytes'] / GIB:.1f} GiB).")
    return "\n".join(out)


def memory_check(t: dict, table_rows: list[dict]) -> str:
    """The sentence that says what the memory table is, with the numbers of both files."""
    rows = t["rows"]
    big = [r for r in rows if r["phase"] != "reward"]
    worst = max(big, key=lambda r: abs(r["error"]))
    fams = sorted({r["family"] for r in rows})
    r0 = table_rows[0]
    return (f"It is a prediction, sized with FakeTensors for a CUDA card, and it has not been checked against a GPU "
            f"yet. On the CPU it is checked against an instrument independent of it (the kernel's peak resident set "
            f"size of the process, per phase, `bench/instrument.py`) at full width and one block per list, at small "
            f"shapes ({t['shape']['resolution']} px, {t['shape']['text_tokens']} text tokens, the tree forking once): "
            f"over "
            f"{len(rows)} phase readings of {', '.join(NAMES[f] for f in fams)} (checkpointing on and off, training "
            f"batches {', '.join(str(b) for b in sorted({r['max_train_batch'] for r in rows}))}), every phase's "
            f"transient is within {t['tolerance']:.0%} (or {t['tolerance_bytes'] / MIB:.0f} MiB) of the measured "
            f"one at steady state, the largest error {abs(worst['error']):.1%} ({NAMES[worst['family']]}, "
            f"{worst['phase']}; `bench/transients.json`). *needs* adds the caching allocator's margin "
            f"({r0['margin']:.0%}, the Trainer Settings' `memory_margin`) and {r0['reserve_bytes'] / GIB:.0f} GiB "
            f"for the CUDA context and workspaces, which the Trainer's budget check keeps too; rows assume "
            f"{r0['prompts_per_iteration']} prompt per iteration (the shipped workflows'). `scripts/gpu_check.sh` "
            f"measures such rows on a GPU when one is lent.")


def transients_table(t: dict) -> str:
    """``bench.scale --transients``: predicted / measured transient per phase (MiB, iteration 2)."""
    out = ["| model | ckpt | train batch | rollout | decode | reward | update | metrics | largest error |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in t["rows"]:
        groups.setdefault((r["family"], r["checkpointing"], r["max_train_batch"]), {})[r["phase"]] = r
    for (fam, ckpt, tb), ph in groups.items():
        cells = [f"{ph[p]['predicted'] / MIB:.1f} / {ph[p]['measured'][-1] / MIB:.1f}" if p in ph else "–"
                 for p in ("rollout", "decode", "reward", "update", "metrics")]
        worst = max((r for p, r in ph.items() if p != "reward"), key=lambda r: abs(r["error"]))
        out.append(f"| {NAMES[fam]} | {'on' if ckpt else 'off'} | {tb} | " + " | ".join(cells)
                   + f" | {abs(worst['error']):.1%} ({worst['phase']}) |")
    return "\n".join(out)


def demo(s: dict) -> str:
    """The demo's transcript, its figures from ``run_demo.py --summary``."""
    first = s["metrics"][0]
    r = s["reward"]
    lines = ["```",
             "[demo] running node 5: BranchGRPOTrainer",
             f"[demo]   iteration 1/{r['iterations']}: reward mean {first['reward_mean']:.4f} (best "
             f"{first['reward_max']:.4f}, worst {first['reward_min']:.4f})",
             "...",
             f"[demo] done: the workflow ran in {s['seconds']:.0f} s ({s['seconds'] / 60:.1f} min)",
             f"[demo] reward (colorfulness; mean of the first vs last {r['window']} of {r['iterations']} iterations): "
             f"{r['first']:.4f} -> {r['last']:.4f} ({r['gain']:+.4f})"]
    for lo in s["loras"]:
        lines.append(f"[demo] LoRA:  <checkout>/.comfy-base/models/loras/{lo['name']}")
    for im in s["images"][:2]:
        rel = im["path"].split("/output/", 1)[-1]
        lines.append(f"[demo] image: <checkout>/.comfy-base/output/{rel}  ({im['title']})")
    lines.append("```")
    return "\n".join(lines)


def render(name: str, root: Path = ROOT) -> str:
    if name == "memory-table":
        return memory_table(load(name, root)["table"])
    if name == "memory-fits":
        return memory_fits(load(name, root)["table"])
    if name == "memory-check":
        return memory_check(load(name, root)["transients"], load("memory-table", root)["table"])
    if name in ("transients-table", "transients-256"):
        return transients_table(load(name, root)["transients"])
    if name == "demo":
        return demo(load(name, root))
    raise KeyError(name)
