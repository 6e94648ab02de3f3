"""Flow-matching pre-training of the demo's toy DiT (:mod:`branchgrpo.models.toy_dit`), with an on-disk cache.

Usage::

    python -m demo.pretrain            # train if the cache is missing/stale, then report
    python -m demo.pretrain --force    # retrain even if cached

From code::

    from demo.pretrain import load_pretrained, sample
    net = load_pretrained()               # ToyDiT (eval mode), trains (~3 min on 2 cores) if needed
    x0 = sample(net, [0, 1, 2], steps=20, shift=3.0, seed=0)   # [3, 3, 16, 16] in [-1, 1]

Training is deterministic given the seed: a fixed number of AdamW steps on freshly generated
synthetic images (:func:`branchgrpo.models.toy_data.synthetic_batch`), logit-normal sigma sampling,
velocity MSE, 10% class dropout (null class, for optional CFG), EMA of the weights (the EMA
weights are what gets cached). The cache is ``demo/.cache/toy_dit.safetensors`` plus
``toy_dit.json`` (architecture, training settings, final loss, wall time); a cache whose json
does not match the current architecture/training settings is treated as missing. ``demo/make_demo_model.py``
exports the cached weights as ``demo/tiny_t2i.safetensors``; the toy benchmark (``bench/``) uses the same cache.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import load_file, save

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python -m demo.pretrain` from the repository root, or an import from elsewhere
    sys.path.insert(0, str(REPO))

from branchgrpo.fileio import atomic_write  # noqa: E402
from branchgrpo.models.toy_data import synthetic_batch  # noqa: E402
from branchgrpo.models.toy_dit import CLASS_NAMES, ToyDiT, ToyDiTConfig, ToyVelocityModel, decode, sample  # noqa: E402

__all__ = [
    "TrainConfig",
    "CACHE_DIR",
    "DATA_VERSION",
    "ARCH_VERSION",
    "train",
    "load_pretrained",
    "load_velocity_model",
    "sample",
]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
WEIGHTS_NAME = "toy_dit.safetensors"
CONFIG_NAME = "toy_dit.json"
#: Bump when :func:`synthetic_batch` changes, so stale caches are retrained.
DATA_VERSION = 1
#: Bump when :class:`branchgrpo.models.toy_dit.ToyDiT` changes in a way its config does not capture.
ARCH_VERSION = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 60
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    class_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


def _lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model_config: Optional[ToyDiTConfig] = None,
    train_config: Optional[TrainConfig] = None,
    log_every: int = 50,
    verbose: bool = True,
) -> tuple:
    """Train a fresh ToyDiT; returns ``(ema_model, info_dict)``."""
    mc = model_config or ToyDiTConfig()
    tc = train_config or TrainConfig()
    torch.manual_seed(tc.seed)
    net = ToyDiT(mc)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(tc.seed)
    t0 = time.perf_counter()
    running, losses = None, []
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        y = torch.randint(0, mc.num_classes, (tc.batch,), generator=g)
        x0 = synthetic_batch(y, size=mc.img_size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(tc.logit_mean + tc.logit_std * torch.randn(tc.batch, generator=g))
        drop = torch.rand(tc.batch, generator=g) < tc.class_dropout
        y_in = torch.where(drop, torch.full_like(y, net.null_class), y)
        s = sigma[:, None, None, None]
        x_sigma = (1 - s) * x0 + s * noise
        loss = torch.mean((net(x_sigma, sigma, y_in) - (noise - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        opt.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        li = loss.item()
        losses.append(li)
        running = li if running is None else 0.95 * running + 0.05 * li
        if verbose and (step % log_every == 0 or step == tc.steps - 1):
            print(
                f"step {step:5d}/{tc.steps}  loss {li:.4f}  avg {running:.4f}  "
                f"lr {_lr_at(step, tc):.2e}  {time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
    wall = time.perf_counter() - t0
    tail = losses[-50:]
    info = {"final_loss": sum(tail) / len(tail), "train_seconds": wall}
    ema.eval()
    return ema, info


def _meta(mc: ToyDiTConfig, tc: TrainConfig) -> Dict:
    return {
        "model": mc.to_dict(),
        "train": asdict(tc),
        "data_version": DATA_VERSION,
        "arch_version": ARCH_VERSION,
        "class_names": list(CLASS_NAMES),
    }


def save_cache(net: ToyDiT, meta: Dict, cache_dir: Union[str, Path] = CACHE_DIR) -> Path:
    cache_dir = Path(cache_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(cache_dir / WEIGHTS_NAME, lambda fh: fh.write(save(state)))
    atomic_write(cache_dir / CONFIG_NAME, lambda fh: json.dump(meta, fh, indent=2), binary=False)
    return cache_dir / WEIGHTS_NAME


def _cache_matches(meta_path: Path, expected: Dict) -> bool:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in expected.items())


def load_pretrained(
    train_if_missing: bool = True,
    cache_dir: Union[str, Path] = CACHE_DIR,
    model_config: Optional[ToyDiTConfig] = None,
    train_config: Optional[TrainConfig] = None,
    device: Union[str, torch.device] = "cpu",
    verbose: bool = True,
) -> ToyDiT:
    """The pre-trained ToyDiT (EMA weights, eval mode) from the cache, training it if needed.

    Raises ``FileNotFoundError`` when the cache is missing or stale and ``train_if_missing``
    is false.
    """
    mc = model_config or ToyDiTConfig()
    tc = train_config or TrainConfig()
    cache_dir = Path(cache_dir)
    weights, meta_path = cache_dir / WEIGHTS_NAME, cache_dir / CONFIG_NAME
    expected = _meta(mc, tc)
    if weights.exists() and _cache_matches(meta_path, expected):
        net = ToyDiT(mc)
        net.load_state_dict(load_file(str(weights)))
        return net.eval().to(device)
    if not train_if_missing:
        raise FileNotFoundError(f"no matching pre-trained toy model in {cache_dir} (run `python -m demo.pretrain`)")
    if verbose:
        print(f"[demo.pretrain] training the toy DiT ({tc.steps} steps, batch {tc.batch}); cache: {cache_dir}",
              flush=True)
    net, info = train(mc, tc, verbose=verbose)
    save_cache(net, {**expected, **info}, cache_dir)
    if verbose:
        print(f"[demo.pretrain] done in {info['train_seconds']:.1f}s, final loss {info['final_loss']:.4f}", flush=True)
    return net.eval().to(device)


def load_velocity_model(**kwargs) -> ToyVelocityModel:
    """:func:`load_pretrained` wrapped as the engine's :class:`ToyVelocityModel`."""
    return ToyVelocityModel(load_pretrained(**kwargs))


def _report(net: ToyDiT, cache_dir: Path, n_per_class: int = 8, steps: int = 20, shift: float = 3.0) -> None:
    """Save a sample grid (and a data grid) and print JPEG-compressibility statistics."""
    import torch.nn.functional as F
    from PIL import Image

    from branchgrpo.rewards.weight_free import JpegCompressibility

    k = net.config.num_classes
    y = torch.arange(k).repeat_interleave(n_per_class)
    t = time.perf_counter()
    x0 = sample(net, y, steps=steps, shift=shift, seed=1234)
    t_sample = time.perf_counter() - t
    data = synthetic_batch(y, size=net.config.img_size, generator=torch.Generator().manual_seed(4321))

    def grid(x, path):
        img = decode(x).permute(0, 3, 1, 2)
        img = F.interpolate(img, scale_factor=6, mode="nearest")
        n, c, h, w = img.shape
        rows = img.reshape(k, n_per_class, c, h, w)
        pad = 2
        canvas = torch.ones(c, k * (h + pad), n_per_class * (w + pad))
        for i in range(k):
            for j in range(n_per_class):
                canvas[:, i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = rows[i, j]
        arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(path)

    grid(x0, cache_dir / "samples_grid.png")
    grid(data, cache_dir / "data_grid.png")
    reward = JpegCompressibility()
    rs, rd = reward(decode(x0), None), reward(decode(data), None)
    flat = reward(torch.full((1, net.config.img_size, net.config.img_size, 3), 0.25), None).item()
    print(f"sampled {len(y)} images ({steps} steps, shift {shift}) in {t_sample:.2f}s "
          f"-> {cache_dir / 'samples_grid.png'}")
    print(f"jpeg_compressibility  samples: mean {rs.mean():.4f} std {rs.std():.4f} "
          f"[min {rs.min():.4f} max {rs.max():.4f}]")
    print(f"jpeg_compressibility  data:    mean {rd.mean():.4f} std {rd.std():.4f}")
    print(f"jpeg_compressibility  flat image: {flat:.4f}")
    per_class = rs.reshape(k, n_per_class)
    print(f"  within-class std (mean over classes): {per_class.std(dim=1).mean():.4f}")
    for name, row in zip(CLASS_NAMES, per_class):
        print(f"  {name:<20s} mean {row.mean():.4f} std {row.std():.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="retrain even if a matching cache exists")
    p.add_argument("--no-report", action="store_true", help="skip the sample grid / reward statistics")
    p.add_argument("--cache-dir", default=str(CACHE_DIR))
    args = p.parse_args(argv)
    cache_dir = Path(args.cache_dir)
    if args.force:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (cache_dir / name).unlink(missing_ok=True)
    net = load_pretrained(cache_dir=cache_dir)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"ToyDiT: {n_params / 1e6:.2f}M parameters, config {net.config.to_dict()}")
    if not args.no_report:
        with torch.no_grad():
            _report(net, cache_dir)


if __name__ == "__main__":
    main()
