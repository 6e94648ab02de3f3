"""The objective's settings: one dataclass for every method (the run config's ``[objective]`` table).

Fields a method does not read are ignored by it; each method's module documents its own and gives its official
defaults (``defaults()``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ObjectiveConfig:
    name: str = "ppo"
    """``"ppo"`` (SDE edges, :mod:`branchgrpo.loss`), ``"diffusionnft"``, ``"awm"`` or ``"dgpo"``."""
    train_timesteps: int = 4
    """Re-noising timesteps per sample and iteration (NFT: 9 of 10, AWM: 6, DGPO: 4)."""
    first_step: int = 0
    """Timesteps are drawn from the rollout's step indices ``[first_step, last)`` (AWM: 1)."""
    timestep_fraction: float = 1.0
    """``last = max(first_step + 1, int(num_steps * timestep_fraction))`` (NFT 0.99, AWM 0.9)."""
    timestep_sampling: str = "subset"
    """``"subset"``: a random subset of the candidates (NFT, DGPO); ``"stratified"``: one random index
    from each of ``train_timesteps`` equal strata (AWM)."""
    shared_noise: bool = False
    """One re-noising noise per group and timestep (DGPO) instead of one per sample."""
    adv_clip: float = 5.0
    """Advantages are clamped to ``[-adv_clip, adv_clip]`` (``adv_clip_max``)."""
    kl_beta: float = 0.0
    """Weight of ``mean((v - v_ref)^2)`` to the reference (adapter disabled); 0 skips that forward."""
    nft_beta: float = 1.0
    """DiffusionNFT's ``beta`` (1.0; 0.1 for OCR)."""
    awm_weighting: str = "ghuber"
    """AWM's log-likelihood surrogate: ``"uniform"`` ``-mse``, ``"t"`` ``-t*mse`` or ``"ghuber"``."""
    ghuber_power: float = 0.25
    awm_adv_max: float = 1.0
    """AWM rescales the clipped advantage to ``[-awm_adv_max, awm_adv_max]``."""
    awm_clip_range: float = 1.0
    """AWM's PPO ratio clip (1.0 in every official config)."""
    old_kl_beta: float = 0.0
    """AWM's ``ema_beta``: weight of ``mean((v - v_old)^2)`` to the EMA policy (1.0 in its configs)."""
    dpo_beta: float = 100.0
    """DGPO's ``beta_dpo``."""
    dgpo_clip_range: float = 1e-3
    """DGPO's clip of the denoising loss against the EMA policy (``clip_dsm``); 0 turns it off."""
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    old_decay_flat: int = 0
    """EMA of the old policy after each optimizer step ``n``: ``decay = 0`` for ``n < flat``, else
    ``min((n - flat) * rate, max)``; ``old = decay * old + (1 - decay) * current``."""
    sample_with_old_after: int = -1
    """Roll out with the old (EMA) policy from this iteration on (NFT 0, DGPO 200); -1: never."""

    def validate(self, where: str = "ObjectiveConfig") -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{where}: {name} {msg} (got {getattr(self, name)!r}).")

        from . import OBJECTIVES
        if self.name not in OBJECTIVES:
            raise bad("name", f"must be one of {OBJECTIVES}")
        if self.timestep_sampling not in ("subset", "stratified"):
            raise bad("timestep_sampling", "must be 'subset' or 'stratified'")
        if self.awm_weighting not in ("uniform", "t", "ghuber"):
            raise bad("awm_weighting", "must be 'uniform', 't' or 'ghuber'")
        checks = [
            ("train_timesteps", isinstance(self.train_timesteps, int) and self.train_timesteps >= 1,
             "must be an integer >= 1"),
            ("first_step", isinstance(self.first_step, int) and self.first_step >= 0, "must be an integer >= 0"),
            ("timestep_fraction", 0 < self.timestep_fraction <= 1, "must be in (0, 1]"),
            ("adv_clip", self.adv_clip > 0, "must be > 0"),
            ("kl_beta", self.kl_beta >= 0, "must be >= 0"),
            ("nft_beta", self.nft_beta > 0, "must be > 0"),
            ("ghuber_power", self.ghuber_power > 0, "must be > 0"),
            ("awm_adv_max", self.awm_adv_max > 0, "must be > 0"),
            ("awm_clip_range", self.awm_clip_range > 0, "must be > 0"),
            ("old_kl_beta", self.old_kl_beta >= 0, "must be >= 0"),
            ("dpo_beta", self.dpo_beta > 0, "must be > 0"),
            ("dgpo_clip_range", self.dgpo_clip_range >= 0, "must be >= 0 (0 = no clip)"),
            ("old_decay_rate", self.old_decay_rate >= 0, "must be >= 0"),
            ("old_decay_max", 0 <= self.old_decay_max < 1, "must be in [0, 1)"),
            ("old_decay_flat", self.old_decay_flat >= 0, "must be >= 0"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise bad(name, msg)

    @property
    def forward_process(self) -> bool:
        return self.name != "ppo"

    @property
    def method(self):
        """The module of this objective (the registry in :mod:`branchgrpo.objectives`)."""
        from . import method_module
        return method_module(self.name)

    def needs_old_forward(self) -> bool:
        """Whether the loss evaluates the old (EMA) policy."""
        return self.method.needs_old_forward(self)

    def needs_old(self) -> bool:
        """Whether the trainer keeps an old (EMA) policy."""
        return self.forward_process and (self.needs_old_forward() or self.sample_with_old_after >= 0)

    def needs_reference(self) -> bool:
        return self.method.needs_reference(self)
