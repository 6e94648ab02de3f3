"""Metrics Plot: the run's health per iteration, as an IMAGE.

Four panels: the reward (mean, best, worst, and the held-out evaluation reward when the run has one), the
reward's spread within trees (before normalisation: the signal GRPO learns from), the fraction of clipped
PPO ratios with the KL to the reference model, and the gradient norm before clipping.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from . import types as T

REWARD = (("reward_mean", "mean", (40, 110, 220)), ("reward_max", "best", (60, 170, 90)),
          ("reward_min", "worst", (210, 70, 60)), ("eval_reward", "held-out (ODE)", (150, 60, 190)))
SPREAD = (("reward_spread", "within-tree reward std", (0, 140, 150)),)
CLIP_KL = (("clipfrac", "clip fraction", (200, 120, 30)), ("kl_ref", "KL to base", (110, 80, 200)))
GRAD = (("grad_norm", "gradient norm (before clipping)", (140, 100, 20)),)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _range(values) -> tuple[float, float] | None:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # a flat curve: a band around it instead of dividing by zero
        pad = max(abs(hi) * 0.05, 0.5)
        return lo - pad, hi + pad
    return lo, hi


def _panel(draw, box, xs, series, title, shared=True):
    """``series``: (values, label, colour). ``shared``: one y range for all; otherwise each series is scaled
    to its own range, the first labelled on the left, the second on the right (in its colour)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((x0 + 6, y0 + 4), title, fill=(30, 30, 30))
    lx = x0 + 10 + draw.textlength(title)
    for values, label, colour in series:
        last = next((v for v in reversed(values) if _finite(v)), None)
        if last is None:
            continue
        text = f"{label} {_fmt(last)}"
        draw.text((lx, y0 + 4), text, fill=colour)
        lx += draw.textlength(text) + 12
    if shared:
        common = _range([v for values, _, _ in series for v in values])
        ranges = [common] * len(series)
    else:
        ranges = [_range(values) for values, _, _ in series]
    if all(r is None for r in ranges):
        draw.text((x0 + 6, y0 + 20), "no data yet", fill=(120, 120, 120))
        return
    left, right = x0 + 56, x1 - (56 if not shared and len(series) > 1 else 10)
    top, bottom = y0 + 20, y1 - 8
    xa, xb = (min(xs), max(xs)) if xs else (0, 1)

    def px(x):
        return left + (right - left) * ((x - xa) / (xb - xa) if xb > xa else 0.5)

    for k, ((values, _, colour), r) in reversed(list(enumerate(zip(series, ranges)))):  # the first on top
        if r is None:
            continue
        lo, hi = r
        if k == 0 or not shared:  # axis labels: the shared range once, else each series' own in its colour
            ax, col = (x0 + 6 if k == 0 else right + 6), ((90, 90, 90) if shared else colour)
            draw.text((ax, top), _fmt(hi), fill=col)
            draw.text((ax, bottom - 12), _fmt(lo), fill=col)
        pts = [(px(x), bottom - (bottom - top) * ((v - lo) / (hi - lo))) for x, v in zip(xs, values) if _finite(v)]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=2)


def _column(history: list[dict], key: str) -> list:
    return [h.get(key) for h in history]


def render_metrics(history: list[dict], width: int = 768, height: int = 512) -> torch.Tensor:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    xs = [h.get("iteration", i + 1) if _finite(h.get("iteration")) else i + 1 for i, h in enumerate(history)]
    kl_key = "kl_ref" if any(_finite(h.get("kl_ref")) for h in history) else "kl"  # older runs: the KL term
    clip_kl = [(_column(history, "clipfrac"), CLIP_KL[0][1], CLIP_KL[0][2]),
               (_column(history, kl_key), CLIP_KL[1][1] if kl_key == "kl_ref" else "KL term", CLIP_KL[1][2])]
    panels = [
        ([(_column(history, k), label, c) for k, label, c in REWARD], "reward", True),
        ([(_column(history, k), label, c) for k, label, c in SPREAD], "reward spread", True),
        (clip_kl, "clip & KL", False),
        ([(_column(history, k), label, c) for k, label, c in GRAD], "gradient", True),
    ]
    weights = (0.34, 0.22, 0.22, 0.22)
    y = 4
    for (series, title, shared), w in zip(panels, weights):
        h = int((height - 8) * w)
        _panel(draw, (4, y, width - 4, min(height - 4, y + h - 4)), xs, series, title, shared)
        y += h
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class MetricsPlotNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOMetricsPlot", display_name="Metrics Plot (BranchGRPO)", category=T.CATEGORY,
            description="Draws the run's health per iteration as an image: the reward (mean, best, worst, and the "
                        "held-out ODE reward when evaluation prompts are set), the reward's spread within trees "
                        "(no spread: nothing to learn from), the fraction of clipped ratios with the KL to the base "
                        "model (how far the update moves), and the gradient norm before clipping.",
            inputs=[
                T.Metrics.Input("metrics", tooltip="The Trainer's metrics output."),
                io.Int.Input("width", default=768, min=256, max=4096, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=256, max=4096, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The plot, as an IMAGE.")],
        )

    @classmethod
    def execute(cls, metrics, width, height) -> io.NodeOutput:
        return io.NodeOutput(render_metrics(metrics.get("history", []), width, height))
