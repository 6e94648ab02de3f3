"""The toy benchmark's pre-trained model: the demo's toy DiT and its pre-training cache (``demo/pretrain.py``).

    python -m bench.pretrain            # same as python -m demo.pretrain
    python -m bench.pretrain --force

The model (:mod:`branchgrpo.models.toy_dit`), its data (:mod:`branchgrpo.models.toy_data`) and its pre-training
(:mod:`demo.pretrain`) belong to the product; the benchmark only imports them.
"""
from __future__ import annotations

from demo.pretrain import (ARCH_VERSION, CACHE_DIR, DATA_VERSION, TrainConfig, load_pretrained,  # noqa: F401
                           load_velocity_model, main, sample, train)

__all__ = ["TrainConfig", "CACHE_DIR", "DATA_VERSION", "ARCH_VERSION", "train", "load_pretrained",
           "load_velocity_model", "sample"]

if __name__ == "__main__":
    main()
