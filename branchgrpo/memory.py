"""One memory accounting for a training run: what the Trainer predicts and what the benchmark measures.

A run holds, at the peak of each phase, some **resident** memory (what lives across phases) and some
**transient** memory (what a phase allocates and frees again):

=========  ===============================================================================================
phase      resident + transient
=========  ===============================================================================================
rollout    weights + LoRA (+ AdamW state) + conditioning + the previous tree; the tree being built, and the
           activations of one no-grad model call of ``max_batch`` latents
decode     the same + the tree + the VAE's weights; one chunk's decode activations and the decoded leaves
reward     the same + the reward model's weights; the decoded leaves and one chunk's scoring activations
update     weights + LoRA + AdamW state + trees; the tensors saved for backward of one chunk of
           ``max_train_batch`` parents, the backward's own temporaries and the LoRA's gradients
metrics    the KL to the base model measured on a few parents after the update: no-grad model calls
=========  ===============================================================================================

Both sides count bytes the same way, with the same tools of this module:

* :class:`LiveTensors` (a ``TorchDispatchMode``) sees every tensor an operator creates, keyed by storage
  (views share their base's bytes), and follows the storage's lifetime with a weak reference, so it knows
  the bytes alive at every moment and their peak. It works unchanged on real tensors (the measurement),
  under ``FakeTensorMode`` and on the ``meta`` device (sizing without arithmetic): the same shapes give the
  same bytes.
* :class:`SavedTensors` counts the tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage, per block and in total; the
  parameters themselves are not counted again.
* :func:`tensor_bytes` / :func:`module_bytes` / :func:`optimizer_bytes` / :func:`tree_bytes` count what is
  resident, by dtype for weights.

:func:`plan_run` puts the phases together from probes (one model call of each kind, sized under
``FakeTensorMode``) and the schedule; :func:`extrapolate_depth` takes sizes at a few depths to the full
depth (exact when each block of a list is the same, which holds for every family here).
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["cpu_internal_bytes", "storage_key", "tensor_bytes", "module_bytes", "optimizer_bytes", "tree_bytes", "planned_tree_bytes",
           "LiveTensors", "SavedTensors", "Phase", "RunMemory", "plan_run", "extrapolate_depth", "cards_fitting",
           "CARDS_GB", "gib", "ADAMW_BYTES_PER_PARAM"]

CARDS_GB = (24, 48, 80)
ADAMW_BYTES_PER_PARAM = 16
"""fp32 LoRA parameter + its gradient + AdamW's two moments (the step counters are a few bytes per tensor)."""


def gib(n: float) -> float:
    return n / 2 ** 30


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage a tensor's bytes live in (shared by all its views); real, fake or meta."""
    return t.untyped_storage()._cdata


def _storage_nbytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def tensor_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the distinct storages of ``tensors`` (a view of a counted storage adds nothing)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        k = storage_key(t)
        if k not in seen:
            seen.add(k)
            total += _storage_nbytes(t)
    return total


def module_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers by dtype name (``bfloat16``, ``float8_e4m3fn``, ...)."""
    out: dict[str, int] = {}
    seen: set = set()
    for t in list(module.parameters()) + list(module.buffers()):
        n = tensor_bytes([t], seen)
        if n:
            name = str(t.dtype).replace("torch.", "")
            out[name] = out.get(name, 0) + n
    return out


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors (AdamW: two moments per parameter, and step counters)."""
    seen: set = set()
    return sum(tensor_bytes([v], seen) for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def tree_bytes(tree: Any) -> int:
    """Bytes of a stored :class:`~branchgrpo.tree.Tree`: latents of every node, per-edge records, the leaves' x0."""
    if tree is None:
        return 0
    return tensor_bytes(v for v in vars(tree).values() if isinstance(v, torch.Tensor))


def planned_tree_bytes(schedule: Any, num_prompts: int, latent_shape: Sequence[int]) -> dict[str, int]:
    """Bytes of the tree a rollout of ``schedule`` will store (mirrors :func:`branchgrpo.tree.rollout`):

    ``stored``: fp32 latents of every node, fp32 x0 of every leaf, and the per-node records (parent, depth,
    tree, root as int64; log-prob fp32; two bool flags) plus the leaf ids and the sigmas.
    ``building``: the peak while it is assembled: the per-step latents and the concatenated copy coexist
    for a moment, as do the per-step records and their concatenation."""
    latent = math.prod(int(s) for s in latent_shape) * 4
    widths = [w * num_prompts for w in [schedule.group_size, *schedule.width_after()]]  # nodes per depth
    nodes = sum(widths)
    leaves = widths[-1]
    records = nodes * (4 * 8 + 4 + 2)
    stored = nodes * latent + leaves * latent + records + leaves * 8 + (schedule.num_steps + 1) * 8
    return {"stored": stored, "building": stored + nodes * latent + records, "nodes": nodes, "leaves": leaves}


#: elementwise operators whose CPU kernels cast an operand of another floating dtype into a temporary buffer
_PROMOTING_OPS = {"add", "sub", "mul", "div", "rsub", "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv"}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_internal_bytes(func, args, kwargs, out=None, device: str | None = None) -> int:
    """Bytes a CPU operator allocates inside its kernel, beyond its outputs: memory no tensor shows, measured
    against the kernel's peak resident set size (``bench.instrument``) and modelled here so that the prediction
    counts it. Two cases matter for the models here (0 otherwise, and on every other device):

    * an elementwise operator on floating tensors of different dtypes (ComfyUI's LoRA ``w + scale * diff``: a
      bf16 weight and an fp32 delta): the operand of the other dtype is cast into a temporary of the result's
      dtype, ``numel x itemsize``;
    * ``bmm`` / ``baddbmm`` in bf16 / fp16 with an operand broadcast over the batch (stride 0; what ``F.linear``
      makes of a non-contiguous 3-D input: the weight expanded per sample): the operand is materialised, and a
      non-contiguous one copied; fp32 goes to a BLAS that takes the strides as they are;
    * a 2-D convolution (oneDNN): its blocked layout copies the larger of input and output (channels padded to
      blocks of 16) and the weight, and pads an output of other than a multiple of 16 channels once more;
    * ``upsample_nearest2d``: computed in channels-last, then copied back (the output again, and the input).

    Fitted on this pack's models (FLUX / SD3 / Wan blocks, ComfyUI's TAESD decoder) at a few shapes each, within
    a few per cent of each kernel's measured peak; ``out`` is the operator's result. ``device``: the device the
    operator will run on when it is not the tensors' own (a prediction for CUDA probed on fake CPU tensors:
    CUDA's kernels cast inside the kernel and take broadcast operands as they are).
    """
    name = getattr(getattr(func, "_schema", None), "name", "").split("::")[-1]
    if name.endswith("_"):
        name = name[:-1]
    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    if not tensors or (device or tensors[0].device.type) != "cpu" or \
            (device is None and any(t.device.type != "cpu" for t in tensors)):
        return 0
    if name in _PROMOTING_OPS:
        floats = [t for t in tensors if t.is_floating_point()]
        if len({t.dtype for t in floats}) < 2:
            return 0
        common = floats[0].dtype
        for t in floats[1:]:
            common = torch.promote_types(common, t.dtype)
        size = torch.empty((), dtype=common).element_size()
        return sum(t.numel() * size for t in floats if t.dtype != common and t.dim() > 0)
    if name == "convolution" and tensors[0].dim() == 4 and tensors[0].is_floating_point():
        # oneDNN works in its blocked layout (channels in blocks of 16): the input or the output is reordered
        # (whichever is larger), the weight too, and an output of fewer than 16 channels is padded to a block
        x, w = tensors[0], tensors[1]
        n, _, h, wd = x.shape
        o, k_h, k_w = w.shape[0], w.shape[2], w.shape[3]
        stride, padding, dilation = (list(args[i]) if len(args) > i else [1, 1] for i in (3, 4, 5))
        oh = (h + 2 * padding[0] - dilation[0] * (k_h - 1) - 1) // stride[0] + 1
        ow = (wd + 2 * padding[1] - dilation[1] * (k_w - 1) - 1) // stride[1] + 1
        padded_out = n * (-(-o // 16) * 16) * oh * ow * x.element_size()
        x_bytes, w_bytes = x.numel() * x.element_size(), w.numel() * w.element_size()
        return max(x_bytes, padded_out) + w_bytes + (padded_out if o % 16 else 0)
    if name == "upsample_nearest2d":
        # computed in channels-last and copied back: the output once more, and the input
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in outs + tensors[:1])
    if name in ("bmm", "baddbmm"):
        extra = 0
        for t in tensors:
            if t.dim() == 3 and t.dtype in _LOW_PRECISION and not t.is_contiguous():
                extra += t.numel() * t.element_size()
        return extra
    return 0


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are still alive; their peak, overall and per phase.

    Every operator output that does not alias an input is a new storage: its bytes are added, and a weak
    reference on the storage subtracts them when the storage is freed (by whatever held it last: a Python
    name, autograd's saved tensors, a view). Tensors that existed before the mode was entered are not
    counted (count them as resident). ``phase(name)`` starts a phase whose peak is kept apart; a phase
    starts at the bytes alive when it begins. Buffers a CPU kernel allocates inside itself
    (:func:`cpu_internal_bytes`) count at the moment the operator runs."""

    def __init__(self, kernel_device: str | None = None) -> None:
        super().__init__()
        self.kernel_device = kernel_device  # whose kernels' own buffers count (None: the tensors' device)
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self._live: dict[int, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None
        self.internal_peak = 0  # the largest buffer an operator allocated inside its kernel (cpu_internal_bytes)

    # ----------------------------------------------------------------- bookkeeping
    def _freed(self, key: int) -> None:
        n = self._live.pop(key, 0)
        self.current -= n

    def _track(self, t: torch.Tensor, input_keys: set) -> None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or nested tensors: no single storage
            return
        k = s._cdata
        if k in self._live or k in input_keys:
            return
        n = int(s.nbytes())
        self._live[k] = n
        self.current += n
        self.allocated += n
        weakref.finalize(s, self._freed, k)
        if self.current > self.peak:
            self.peak = self.current
        if self._phase is not None and self.current > self.phase_peaks[self._phase]:
            self.phase_peaks[self._phase] = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = getattr(func, "_schema", None)
        if schema is not None and any(r.alias_info is not None for r in schema.returns):
            return out  # views and in-place results live in an input's storage
        flat_in, _ = tree_flatten((args, kwargs))
        input_keys = set()
        for a in flat_in:
            if isinstance(a, torch.Tensor):
                try:
                    input_keys.add(storage_key(a))
                except (RuntimeError, NotImplementedError):
                    pass
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor):
                self._track(t, input_keys)
        extra = cpu_internal_bytes(func, args, kwargs, out, self.kernel_device)  # the kernel's own buffers, alive while it ran
        if extra:
            self.internal_peak = max(self.internal_peak, extra)
            if self.current + extra > self.peak:
                self.peak = self.current + extra
            if self._phase is not None and self.current + extra > self.phase_peaks[self._phase]:
                self.phase_peaks[self._phase] = self.current + extra
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self._phase
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = previous

    def set_phase(self, name: str | None) -> None:
        """Switch phase without a ``with`` block (for callbacks)."""
        self._phase = name
        if name is not None:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)


class SavedTensors:
    """Counts what autograd saves for backward inside the ``with`` block, by storage, per block and in total.

    ``exclude``: tensors whose storages are not counted (the model's parameters: they are resident anyway).
    ``label_blocks(lists)`` names every block of the given ``ModuleList`` s (``"double_blocks.0"``) so that a
    saved tensor is attributed to the block that saved it first; saves outside any block go to ``"other"``.
    (Inside a checkpointed region autograd saves through the checkpoint's own hooks, not these: count a
    block's saved tensors with checkpointing off.)"""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {storage_key(t) for t in exclude}
        self._seen: set[int] = set()
        self.per_block: dict[str, int] = {}
        self.total = 0
        self._label: list[str] = ["other"]
        self._handles: list = []
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            k = storage_key(t)
        except (RuntimeError, NotImplementedError):
            return t
        if k not in self._exclude and k not in self._seen:
            self._seen.add(k)
            n = _storage_nbytes(t)
            self.total += n
            label = self._label[-1]
            self.per_block[label] = self.per_block.get(label, 0) + n
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def label_blocks(self, named_lists: Mapping[str, torch.nn.ModuleList]) -> None:
        for list_name, blocks in named_lists.items():
            for i, block in enumerate(blocks):
                name = f"{list_name}.{i}"
                self._handles.append(block.register_forward_pre_hook(
                    lambda m, a, _n=name: self._label.append(_n)))
                self._handles.append(block.register_forward_hook(lambda m, a, o: self._leave()))

    def _leave(self) -> None:  # a forward hook must return None (a value would replace the block's output)
        if len(self._label) > 1:
            self._label.pop()

    def per_list(self) -> dict[str, int]:
        """Mean saved bytes per block of each block list (``double_blocks``: bytes per double block)."""
        sums: dict[str, list[int]] = {}
        for label, n in self.per_block.items():
            if label == "other":
                continue
            sums.setdefault(label.rsplit(".", 1)[0], []).append(n)
        return {k: sum(v) // len(v) for k, v in sums.items()}

    def __enter__(self) -> "SavedTensors":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class Phase:
    """Bytes held at the peak of one phase, by component (``transient`` is what the phase itself allocated)."""
    name: str
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))


@dataclass
class RunMemory:
    """The phases of a run and their peaks; ``peak`` is the largest."""
    phases: list[Phase] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max((p.total for p in self.phases), default=0)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.total).name if self.phases else ""

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak, "peak_phase": self.peak_phase,
                "phases": {p.name: {**p.components, "total": p.total} for p in self.phases},
                "details": self.details}

    def summary(self) -> str:
        parts = ", ".join(f"{p.name} {gib(p.total):.2f}" for p in self.phases)
        return f"peak {gib(self.peak):.2f} GiB in the {self.peak_phase} ({parts} GiB)"


def plan_run(*, weights: int, lora_params: int, conditioning: int, tree: Mapping[str, int],
             rollout_call: int, update_chunk: int, metrics_call: int = 0, vae_weights: int = 0,
             decode_chunk: int = 0, reward_weights: int = 0, reward_chunk: int = 0, images: int = 0,
             keep_previous_tree: bool = True, phase_models: bool = True) -> RunMemory:
    """The phases of one training iteration (:meth:`branchgrpo.trainer.BranchGRPOTrainer.step`) from sizes in bytes.

    ``tree``: :func:`planned_tree_bytes`. Transient peaks from probes: ``rollout_call`` (one no-grad model call
    of the rollout's batch), ``update_chunk`` (one forward + backward of ``max_train_batch`` parents, LoRA
    gradients included), ``metrics_call`` (one no-grad call of the KL measurement after the update),
    ``decode_chunk`` (decoding one chunk, its images included), ``reward_chunk`` (scoring one chunk).
    ``images``: all decoded leaves (the Trainer decodes every leaf, then scores; the chunks are concatenated,
    so chunks and the whole coexist for a moment). ``keep_previous_tree``: the Trainer keeps the last tree
    for its callbacks until the iteration ends. ``phase_models``: the VAE and the reward model are in memory
    only in their phase (else they stay resident)."""
    lora_rest = lora_params * (ADAMW_BYTES_PER_PARAM - 4)  # fp32 weights + AdamW moments; grads set to None
    prev = tree["stored"] if keep_previous_tree else 0
    resident = {"weights": weights, "lora_and_adamw": lora_rest, "conditioning": conditioning}
    if not phase_models:
        resident.update(vae_weights=vae_weights, reward_weights=reward_weights)
    own = (lambda n, k: {k: n}) if phase_models else (lambda n, k: {})
    trees = {"tree": tree["stored"], "previous_tree": prev}
    return RunMemory([
        Phase("rollout", {**resident, "previous_tree": prev,
                          "transient": max(tree["stored"] + rollout_call, tree["building"])}),
        Phase("decode", {**resident, **own(vae_weights, "vae_weights"), **trees,
                         "transient": max(decode_chunk + images, 2 * images)}),
        Phase("reward", {**resident, **own(reward_weights, "reward_weights"), **trees,
                         "transient": reward_chunk + images}),
        Phase("update", {**resident, **trees, "transient": update_chunk}),
        Phase("metrics", {**resident, **trees, "transient": metrics_call}),
    ])


def extrapolate_depth(sizes: Mapping[tuple[int, ...], float], full: Sequence[int]) -> float:
    """A size at the full depth ``full`` (blocks per list) from sizes at smaller depths, assuming it is
    affine in the number of blocks of each list (every block of a list has the same shapes).

    ``sizes`` maps depths (one count per block list) to a size; it needs the base depth and, for every
    list, one depth that adds blocks to that list only, or two depths that add the same number to every
    list when there is only one list. E.g. ``{(1, 1): a, (2, 1): b, (1, 2): c}`` for FLUX's two lists."""
    depths = sorted(sizes, key=sum)
    base = depths[0]
    value = float(sizes[base])
    for i in range(len(base)):
        if full[i] == base[i]:
            continue
        step = [d for d in depths if d != base and all((d[j] == base[j]) == (j != i) for j in range(len(base)))]
        if not step:
            raise ValueError(f"extrapolate_depth: no depth that grows block list {i} alone in {sorted(sizes)}")
        d = step[0]
        per_block = (sizes[d] - sizes[base]) / (d[i] - base[i])
        value += per_block * (full[i] - base[i])
    return value


def cards_fitting(peak_bytes: int, cards_gb: Sequence[int] = CARDS_GB, reserve: float = 0.0) -> list[int]:
    """The card sizes (GB, as sold: 10^9 bytes is not what a 24 GB card has; its memory is 24 GiB) whose
    memory holds ``peak_bytes`` plus a fractional ``reserve`` for the allocator's fragmentation."""
    return [c for c in cards_gb if peak_bytes * (1 + reserve) <= c * 2 ** 30]


def dataclass_dict(obj: Any) -> dict:
    return asdict(obj)
