"""The branching schedule: where a rollout forks, how wide, and which steps are stochastic (SPEC §2).

One dataclass describes every rollout the engine makes:

* BranchGRPO: one root per prompt, forks at ``split_steps`` into ``branching`` children.
* DanceGRPO / Flow-GRPO: ``group_size`` roots per prompt and no splits (a flat group).
* MixGRPO / BranchGRPO-Mix: an SDE window; non-split steps outside it are deterministic (ODE).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .sde import STEP_KINDS, sigma_schedule


@dataclass
class BranchSchedule:
    num_steps: int = 20
    """Denoising steps of a rollout (SPEC: 20 for BranchGRPO on FLUX)."""
    split_steps: tuple[int, ...] = (0, 3, 6, 9)
    """Step indices (0-based, < num_steps) at which every live node forks."""
    branching: int | tuple[int, ...] = 2
    """Children per fork: one K for every split, or one K per split step (K >= 1)."""
    split_noise_scale: float = 4.0
    """The fork's noise is ``scale * std * xi``. The official script uses 4.0 (its README calls it the
    default; its argparse default 0.3 is never used by the published runs)."""
    split_logprob: str = "unscaled"
    """``"unscaled"``: a fork child's log-prob is evaluated under N(mean, std^2), as the official code
    does (consistent between rollout and update, so the PPO ratio is right). ``"exact"``: under the
    true sampling density N(mean, (scale*std)^2)."""
    sde: str = "dancegrpo"
    """SDE kind: ``"dancegrpo"`` (constant eta) or ``"flowgrpo"`` (a*sqrt(sigma/(1-sigma)))."""
    eta: float = 0.3
    """Noise level: DanceGRPO's eta (0.3 for FLUX) or Flow-GRPO's a (0.7)."""
    shift: float = 3.0
    """SD3 timestep shift of the sigma schedule (3 for FLUX in the research code)."""
    group_size: int = 1
    """Independent roots per prompt. 1 for a tree; 12-24 for flat GRPO groups."""
    sde_window: tuple[int, int] | None = None
    """``(start, size)``: only steps in ``[start, start+size)`` and split steps are SDE; others are ODE.
    ``None``: every step is SDE. ``size = 0``: only the split steps are SDE (an ODE rollout when there
    are no splits, for the forward-process objectives, which need no log-probability)."""
    sde_window_range: tuple[int, int] | None = None
    """``(lo, hi)``: the window's start is redrawn every iteration uniformly in ``[lo, hi - size]``
    (Flow-GRPO-Fast). Seeded by the iteration, so a resumed run draws the same windows."""
    branch_step_range: tuple[int, int] | None = None
    """``(lo, hi)``: the one split step is redrawn every iteration uniformly in ``[lo, hi)``
    (TempFlow-GRPO's trajectory branching). Needs exactly one entry in ``split_steps`` (the first
    iteration's placeholder is replaced)."""
    sde_window_slide_every: int = 0
    """Move the SDE window one step later every this many iterations, wrapping to the start
    (MixGRPO's progressive window). 0 keeps it fixed (BranchGRPO-Mix)."""
    timestep_quantum: int = 0
    """If > 0, the model sees ``floor(sigma * q) / q`` (the official FLUX code uses 1000)."""

    # ------------------------------------------------------------------ validation
    def validate(self, where: str = "BranchSchedule") -> None:
        def bad(fieldname: str, msg: str) -> ValueError:
            return ValueError(f"{where}: {fieldname} {msg}")

        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise bad("num_steps", f"must be an integer >= 1 (got {self.num_steps!r}).")
        steps = list(self.split_steps)
        for s in steps:
            if not isinstance(s, int) or not (0 <= s < self.num_steps):
                raise bad("split_steps", f"contains {s!r}, outside the step range 0..{self.num_steps - 1}; "
                          f"use step indices smaller than num_steps={self.num_steps}.")
        if len(set(steps)) != len(steps):
            raise bad("split_steps", f"has duplicates {steps}; list each split step once.")
        ks = self.branching_factors()
        for k in ks:
            if not isinstance(k, int) or k < 1:
                raise bad("branching", f"must be >= 1 for every split (got {k!r}); use 2 for the paper's binary tree.")
        if isinstance(self.branching, (tuple, list)) and len(self.branching) != len(steps):
            raise bad("branching", f"gives {len(self.branching)} factors for {len(steps)} split steps; "
                      "give one factor, or one per split step.")
        if self.split_noise_scale <= 0:
            raise bad("split_noise_scale", f"must be > 0 (got {self.split_noise_scale}).")
        if self.split_logprob not in ("unscaled", "exact"):
            raise bad("split_logprob", f"must be 'unscaled' or 'exact' (got {self.split_logprob!r}).")
        if self.sde not in STEP_KINDS or self.sde == "ode":
            raise bad("sde", f"must be 'dancegrpo' or 'flowgrpo' (got {self.sde!r}).")
        if self.eta <= 0:
            raise bad("eta", f"must be > 0 (got {self.eta}); an ODE-only rollout has nothing to train.")
        if self.shift <= 0:
            raise bad("shift", f"must be > 0 (got {self.shift}).")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise bad("group_size", f"must be an integer >= 1 (got {self.group_size!r}).")
        if self.sde_window is not None:
            start, size = self.sde_window
            if size < 0 or not (0 <= start < self.num_steps):
                raise bad("sde_window", f"must be (start, size) with 0 <= start < {self.num_steps} and size >= 0 "
                          f"(got {self.sde_window}).")
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            size = self.sde_window[1] if self.sde_window is not None else 0
            if self.sde_window is None or size < 1 or not (0 <= lo <= hi - size and hi <= self.num_steps):
                raise bad("sde_window_range", f"must be (lo, hi) with 0 <= lo <= hi - window size and hi <= "
                          f"{self.num_steps}, with an sde_window of size >= 1 (got {self.sde_window_range}, "
                          f"window {self.sde_window}).")
        if self.branch_step_range is not None:
            lo, hi = self.branch_step_range
            if len(steps) != 1 or not (0 <= lo < hi <= self.num_steps - 1):
                raise bad("branch_step_range", f"must be (lo, hi) with 0 <= lo < hi <= {self.num_steps - 1} and "
                          f"exactly one split step (got {self.branch_step_range}, split_steps {steps}).")
        last = self.num_steps - 1
        if last in self.branching_at() and self.branching_at()[last] > 1:
            fix = (f"split at most at step {last - 1}" if last > 0 else
                   "a 1-step rollout has no step to fork at: use at least 2 steps, or no split steps")
            raise bad("split_steps", f"contains the last step {last}: its children all get the clean estimate "
                      f"x0 = x - sigma*v of their common parent, so the siblings are identical images with equal "
                      f"rewards and zero advantage; {fix}.")
        if self.sde_window_slide_every < 0:
            raise bad("sde_window_slide_every", "must be >= 0.")
        if self.num_leaves() < 2:
            raise bad("branching", "gives a single leaf per prompt: GRPO needs at least two samples per prompt; "
                      "add a split step with branching >= 2 or raise group_size.")

    # ------------------------------------------------------------------ structure
    def branching_factors(self) -> tuple[int, ...]:
        if isinstance(self.branching, (tuple, list)):
            return tuple(self.branching)
        return (self.branching,) * len(self.split_steps)

    def branching_at(self) -> dict[int, int]:
        """``{split step: K}``."""
        return dict(zip(self.split_steps, self.branching_factors()))

    def sigmas(self) -> torch.Tensor:
        return sigma_schedule(self.num_steps, self.shift)

    def width_after(self) -> list[int]:
        """Live nodes per prompt after each step (``[num_steps]``)."""
        k = self.branching_at()
        w, out = self.group_size, []
        for i in range(self.num_steps):
            w *= k.get(i, 1)
            out.append(w)
        return out

    def width_before(self) -> list[int]:
        """Nodes per prompt evaluated by the model at each step."""
        after = self.width_after()
        return [self.group_size] + after[:-1]

    def num_leaves(self) -> int:
        return self.width_after()[-1]

    def rollout_nfe(self) -> int:
        """Model evaluations of one prompt's rollout (children of a split share their parent's)."""
        return sum(self.width_before())

    def num_edges(self) -> int:
        """Parent -> child transitions recorded per prompt."""
        return sum(self.width_after())

    def for_iteration(self, iteration: int) -> "BranchSchedule":
        """The schedule of ``iteration``: the split step redrawn when ``branch_step_range`` is set."""
        if self.branch_step_range is None:
            return self
        lo, hi = self.branch_step_range
        g = torch.Generator().manual_seed(1_000_003 * int(iteration) + 29)
        step = lo + int(torch.randint(hi - lo, (1,), generator=g))
        return dataclasses.replace(self, split_steps=(step,), branch_step_range=None)

    def window_start(self, iteration: int) -> int | None:
        if self.sde_window is None:
            return None
        start, size = self.sde_window
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            g = torch.Generator().manual_seed(1_000_003 * int(iteration) + 31)
            return lo + int(torch.randint(hi - size - lo + 1, (1,), generator=g))
        if self.sde_window_slide_every > 0:
            span = max(1, self.num_steps - size + 1)
            start = (start + iteration // self.sde_window_slide_every) % span
        return start

    def is_sde(self, step: int, iteration: int = 0) -> bool:
        """Whether ``step`` is stochastic at training ``iteration`` (0-based)."""
        if self.sde_window is None or step in self.split_steps:
            return True
        start = self.window_start(iteration)
        return start <= step < start + self.sde_window[1]

    def sde_steps(self, iteration: int = 0) -> list[int]:
        return [i for i in range(self.num_steps) if self.is_sde(i, iteration)]

    def describe(self) -> dict:
        return {
            "leaves_per_prompt": self.num_leaves(),
            "rollout_nfe_per_prompt": self.rollout_nfe(),
            "edges_per_prompt": self.num_edges(),
            "width_after_step": self.width_after(),
        }


def parse_steps(text: str | Sequence[int], field_name: str = "split_steps") -> tuple[int, ...]:
    """``"0,3,6,9"`` -> ``(0, 3, 6, 9)``; an empty string gives ``()``."""
    if not isinstance(text, str):
        return tuple(int(t) for t in text)
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"{field_name}: {part!r} is not an integer; write comma-separated integers "
                             f"such as '0,3,6,9'.") from None
    return tuple(out)
