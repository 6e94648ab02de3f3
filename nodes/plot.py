"""Metrics Plot: reward (mean, best, worst), advantage spread and loss per iteration, as an IMAGE."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from . import types as T

SERIES = (("reward_mean", (40, 110, 220)), ("reward_max", (60, 170, 90)), ("reward_min", (210, 70, 60)))


def _panel(draw, box, series, title):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((x0 + 6, y0 + 4), title, fill=(30, 30, 30))
    values = [v for s, _ in series for v in s if v is not None and np.isfinite(v)]
    if not values:
        draw.text((x0 + 6, y0 + 20), "no data yet", fill=(120, 120, 120))
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # a flat curve: centre it instead of dividing by zero
        lo, hi = lo - 0.5, hi + 0.5
    draw.text((x0 + 6, y0 + 18), f"{hi:.4g}", fill=(90, 90, 90))
    draw.text((x0 + 6, y1 - 14), f"{lo:.4g}", fill=(90, 90, 90))
    n = max(len(s) for s, _ in series)
    for s, colour in series:
        pts = []
        for i, v in enumerate(s):
            if v is None or not np.isfinite(v):
                continue
            px = x0 + 50 + (x1 - x0 - 60) * (i / max(1, n - 1))
            py = y1 - 8 - (y1 - y0 - 34) * ((v - lo) / (hi - lo))
            pts.append((px, py))
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=2)


def render_metrics(history: list[dict], width: int = 768, height: int = 512) -> torch.Tensor:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    h3 = height // 3
    col = lambda k: [h.get(k) for h in history]  # noqa: E731
    _panel(draw, (4, 4, width - 4, h3 - 2), [(col(k), c) for k, c in SERIES], "reward: mean / best / worst")
    _panel(draw, (4, h3 + 2, width - 4, 2 * h3 - 2), [(col("adv_std"), (120, 60, 180))], "advantage std (trained edges)")
    _panel(draw, (4, 2 * h3 + 2, width - 4, height - 4), [(col("loss"), (200, 120, 30))], "loss")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class MetricsPlotNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BranchGRPOMetricsPlot", display_name="Metrics Plot (BranchGRPO)", category=T.CATEGORY,
            description="Draws the run's reward (mean, best, worst), advantage spread and loss per iteration "
                        "as an image (flat curves are centred, not divided by zero).",
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
