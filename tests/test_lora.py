"""Tests for branchgrpo.lora: hook adapters, weight deltas, ComfyUI format, atomic files."""
from __future__ import annotations

import copy
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from branchgrpo.lora import LoRA, LoRAConfig, freeze_base, load_lora_file, save_lora

DIM = 16


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = 2
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Net(nn.Module):
    """Names like ``blocks.0.attn.qkv``, ``blocks.1.mlp.2``, ``head``."""

    def __init__(self, dim: int = DIM, depth: int = 2, checkpointed: bool | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 4, bias=False)
        self.checkpointed = checkpointed  # None: plain; else use_reentrant flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            if self.checkpointed is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.checkpointed)
        return self.head(h)


ALL_LINEARS = sorted(
    ["embed", "head"]
    + [f"blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
)


def make(dtype: torch.dtype = torch.float64, **kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).to(dtype)


def randomize(lora: LoRA, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(dtype: torch.dtype = torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------- forward


def test_zero_init_leaves_outputs_unchanged():
    model, x = make(), inputs()
    base = model(x)
    lora = LoRA(model, LoRAConfig(rank=4, alpha=8.0), dtype=torch.float64)
    lora.attach(model)
    assert lora.names == ALL_LINEARS
    assert all(torch.count_nonzero(a.up) == 0 for a in lora.adapters)
    assert torch.equal(model(x), base)


def test_hooks_equal_merged_weights_and_layer_formula():
    model, x = make(), inputs()
    lora = LoRA(model, LoRAConfig(rank=3, alpha=6.0), dtype=torch.float64)
    randomize(lora)
    assert lora.scale == 2.0

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name in lora.names:
            merged.get_submodule(name).weight += lora.delta(name)
    lora.attach(model)
    torch.testing.assert_close(model(x), merged(x), rtol=1e-12, atol=1e-12)

    # Single layer, leading shape [B, L, in]: output == base + x @ (scale * up @ down).T
    layer = model.blocks[1].attn.qkv
    a = lora.adapter("blocks.1.attn.qkv")
    torch.testing.assert_close(lora.delta("blocks.1.attn.qkv"), lora.scale * a.up @ a.down, rtol=0, atol=0)
    h = torch.randn(2, 7, DIM, dtype=torch.float64)
    expected = F.linear(h, layer.weight, layer.bias) + h @ lora.delta("blocks.1.attn.qkv").T
    torch.testing.assert_close(layer(h), expected, rtol=1e-12, atol=1e-12)


def test_gradients_reach_only_adapter_params():
    model, x = make(), inputs()
    freeze_base(model)
    assert not any(p.requires_grad for p in model.parameters())
    lora = LoRA(model, LoRAConfig(rank=2), dtype=torch.float64)
    lora.attach(model)
    model(x).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    grads = {n: p.grad for n, p in lora.named_parameters()}
    assert len(grads) == 2 * len(ALL_LINEARS)
    # up starts at zero, so only the up matrices receive a gradient at step 0, but all of them.
    assert all(g is not None and torch.count_nonzero(g) > 0 for n, g in grads.items() if n.endswith(".up"))


def test_disabled_reproduces_base_and_detach_restores():
    model, x = make(), inputs()
    base = model(x)
    lora = LoRA(model, LoRAConfig(rank=4), dtype=torch.float64)
    randomize(lora)
    lora.attach(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    with lora.disabled():
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.disabled():
            raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)  # re-enabled after the exception

    lora.attach(model)  # idempotent: no double hooks
    assert torch.equal(model(x), adapted)
    lora.detach()
    assert not lora.attached
    assert torch.equal(model(x), base)
    lora.detach()  # no-op


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    x = inputs()
    plain = make()
    lora = LoRA(plain, LoRAConfig(rank=2), dtype=torch.float64)
    randomize(lora)
    freeze_base(plain)
    lora.attach(plain)
    plain(x).square().mean().backward()
    reference = [p.grad.clone() for p in lora.parameters()]
    lora.zero_grad()

    ckpt = make(checkpointed=reentrant)
    freeze_base(ckpt)
    lora.attach(ckpt)
    # Reentrant checkpointing only tracks grads when an input of the segment requires grad.
    ckpt(x.requires_grad_(reentrant)).square().mean().backward()
    for got, want in zip(lora.parameters(), reference):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-12)


def test_bf16_base_with_fp32_adapters():
    model, x = make(torch.bfloat16), inputs(torch.bfloat16)
    lora = LoRA(model, LoRAConfig(rank=4))
    randomize(lora)
    lora.attach(model)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in lora.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    # The adapter term itself is computed in fp32, then cast: compare against an fp32 reference.
    layer, a = model.head, lora.adapter("head")
    h = torch.randn(2, DIM, dtype=torch.bfloat16)
    expected = (F.linear(h, layer.weight).float() + h.float() @ lora.delta("head").T).to(torch.bfloat16)
    torch.testing.assert_close(layer(h), expected, rtol=1e-2, atol=1e-2)


def test_adapter_runs_in_its_own_dtype_under_autocast():
    model = make(torch.float32)
    lora = LoRA(model, LoRAConfig(rank=4))
    randomize(lora)
    lora.attach(model)
    h = torch.randn(2, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.head(h)
        with lora.disabled():
            base = model.head(h)
    assert out.dtype == base.dtype == torch.bfloat16
    torch.testing.assert_close(out, base + (h @ lora.delta("head").T).to(torch.bfloat16))


def test_adapter_dtype_and_device_moves_with_to():
    model, x = make(), inputs()
    lora = LoRA(model, LoRAConfig(rank=2), dtype=torch.float32)
    randomize(lora)
    lora.attach(model)
    out32 = model(x)
    lora.to(torch.float64)
    assert lora.adapter("head").up.dtype == torch.float64
    torch.testing.assert_close(model(x), out32, rtol=1e-5, atol=1e-5)


def test_attach_rejects_wrong_layout():
    lora = LoRA(make(), LoRAConfig(rank=2))
    other = make()
    other.head = nn.Identity()
    with pytest.raises(ValueError, match="'head' is a Identity, not an nn.Linear"):
        lora.attach(other)
    with pytest.raises(ValueError, match="'blocks.0.attn.proj' is 32->32, the adapter 16->16"):
        lora.attach(Net(dim=2 * DIM))
    with pytest.raises(ValueError, match="'blocks.0.attn.proj' is missing"):
        lora.attach(nn.Sequential(nn.Linear(4, 4)))
    assert not lora.attached


# ---------------------------------------------------------------------- selection and config


def test_targets_and_exclude_globs():
    model = make()
    lora = LoRA(model, LoRAConfig(targets=("blocks.*.attn.*",), exclude=("*.proj",)))
    assert lora.names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    lora = LoRA(model, LoRAConfig(targets=("*qkv", "head")))
    assert lora.names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "head"]
    lora = LoRA(model, LoRAConfig(targets=("blocks.1.mlp.*",)))
    assert lora.names == ["blocks.1.mlp.0", "blocks.1.mlp.2"]  # GELU (mlp.1) is not a Linear
    lora = LoRA(model, LoRAConfig(exclude=("blocks.*",)))
    assert lora.names == ["embed", "head"]


def test_linear_subclasses_are_adapted():
    class CastLinear(nn.Linear):  # stands in for comfy.ops Linear
        pass

    root = nn.Sequential(CastLinear(4, 4), nn.ReLU())
    lora = LoRA(root, LoRAConfig(rank=2))
    assert lora.names == ["0"]


def test_no_match_error_lists_available_modules():
    with pytest.raises(ValueError, match=r"targets=\('\*to_q',\).*blocks\.0\.attn\.qkv"):
        LoRA(make(), LoRAConfig(targets=("*to_q",)))
    with pytest.raises(ValueError, match="no nn.Linear at all.*Conv2d"):
        LoRA(nn.Sequential(nn.Conv2d(1, 1, 1)), LoRAConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"targets": "*qkv"}, "targets"),
        ({"targets": ()}, "targets"),
        ({"exclude": ("",)}, "exclude"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoRAConfig\.{field}"):
        LoRAConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=rf"LoRAConfig\.{field}"):
        LoRA(make(), LoRAConfig(**kwargs))


def test_init_std():
    torch.manual_seed(0)
    root = nn.Linear(512, 512)
    lora = LoRA(nn.Sequential(root), LoRAConfig(rank=64, init_std=0.02))
    assert abs(lora.adapter("0").down.std().item() - 0.02) < 0.002
    default = LoRA(nn.Sequential(root), LoRAConfig(rank=64))
    bound = 1 / 512**0.5  # kaiming-uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    assert default.adapter("0").down.abs().max() <= bound


def test_delta_unknown_name():
    lora = LoRA(make(), LoRAConfig(rank=2))
    with pytest.raises(KeyError, match="blocks.0.attn.qkv"):
        lora.delta("nope")


# ---------------------------------------------------------------------- ComfyUI format and files


def _adapted(rank: int = 4, alpha: float = 2.0, **config) -> tuple[Net, LoRA]:
    model = make()
    lora = LoRA(model, LoRAConfig(rank=rank, alpha=alpha, **config))
    randomize(lora)
    return model, lora


def _assert_same(a: LoRA, b: LoRA) -> None:
    assert a.names == b.names and a.rank == b.rank and a.alpha == b.alpha
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.dtype == pb.dtype and torch.equal(pa, pb)


def test_comfy_keys_and_exact_round_trip():
    model, lora = _adapted()
    sd = lora.to_comfy_state_dict()
    expected = {
        f"diffusion_model.{n}.{s}" for n in ALL_LINEARS for s in ("lora_up.weight", "lora_down.weight", "alpha")
    }
    assert set(sd) == expected
    up, down = sd["diffusion_model.blocks.0.attn.qkv.lora_up.weight"], sd["diffusion_model.blocks.0.attn.qkv.lora_down.weight"]
    assert up.shape == (3 * DIM, 4) and down.shape == (4, DIM)
    alpha = sd["diffusion_model.head.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in sd.values())
    sd["diffusion_model.head.lora_up.weight"].add_(1)  # a copy: the adapter is untouched
    assert not torch.equal(lora.adapter("head").up, sd["diffusion_model.head.lora_up.weight"])
    sd = lora.to_comfy_state_dict()

    other = LoRA(model, LoRAConfig(rank=4, alpha=2.0))
    other.load_comfy_state_dict(sd)
    _assert_same(lora, other)

    custom = lora.to_comfy_state_dict(prefix="model")
    assert all(k.startswith("model.") for k in custom)
    inferred = LoRA.from_comfy_state_dict(model, custom, prefix="model")
    _assert_same(lora, inferred)


def test_file_round_trip_with_metadata(tmp_path):
    model, lora = _adapted(rank=3, alpha=1.5, targets=("*attn*",))
    path = tmp_path / "sub" / "adapter.safetensors"
    save_lora(path, lora, metadata={"base": "tiny", "step": 7, "cfg": {"lr": 1e-4}})
    assert os.listdir(path.parent) == ["adapter.safetensors"]  # no temp file left behind
    tensors, meta = load_lora_file(path)
    assert meta == {"base": "tiny", "step": "7", "cfg": '{"lr": 0.0001}'}
    reference = lora.to_comfy_state_dict()
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) and tensors[k].dtype == reference[k].dtype for k in reference)

    inferred = LoRA.from_comfy_state_dict(model, tensors)
    assert inferred.names == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv"]
    assert (inferred.rank, inferred.alpha) == (3, 1.5)
    _assert_same(lora, inferred)

    x = inputs()
    lora.attach(model)
    want = model(x)
    lora.detach()
    inferred.attach(model)
    assert torch.equal(model(x), want)


def test_strict_load_lists_missing_and_unexpected_keys():
    model, lora = _adapted()
    sd = lora.to_comfy_state_dict()
    del sd["diffusion_model.head.alpha"]
    sd["lora_te_text_model.foo.lora_up.weight"] = torch.zeros(1, 1)
    target = LoRA(model, LoRAConfig(rank=4, alpha=2.0))
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(ValueError) as info:
        target.load_comfy_state_dict(sd)
    message = str(info.value)
    assert "missing" in message and "diffusion_model.head.alpha" in message
    assert "unexpected" in message and "lora_te_text_model.foo.lora_up.weight" in message
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), before))  # nothing changed

    # Non-strict: foreign keys ignored, the missing alpha means alpha = rank (ComfyUI's rule)...
    # ...but that makes the file's alphas inconsistent (2.0 vs 4.0), which is refused.
    with pytest.raises(ValueError, match="mixes alphas"):
        target.load_comfy_state_dict(sd, strict=False)


def test_non_strict_load_subset():
    model, lora = _adapted()
    sd = {k: v for k, v in lora.to_comfy_state_dict().items() if ".attn." in k}
    target = LoRA(model, LoRAConfig(rank=4, alpha=2.0))
    head_up = target.adapter("head").up.clone()
    target.load_comfy_state_dict(sd, strict=False)
    assert torch.equal(target.adapter("blocks.0.attn.qkv").up, lora.adapter("blocks.0.attn.qkv").up)
    assert torch.equal(target.adapter("head").up, head_up)
    with pytest.raises(ValueError, match="prefix 'unet'"):
        target.load_comfy_state_dict(sd, prefix="unet", strict=False)


def test_load_adopts_file_rank_and_alpha_when_shapes_allow():
    model, lora = _adapted(rank=4, alpha=2.0)
    sd = lora.to_comfy_state_dict()
    target = LoRA(model, LoRAConfig(rank=8, alpha=16.0))
    target.load_comfy_state_dict(sd)
    assert (target.rank, target.alpha, target.config.rank) == (4, 2.0, 4)
    _assert_same(lora, target)
    x = inputs()
    lora.attach(model)
    want = model(x)
    lora.detach()
    target.attach(model)
    assert torch.equal(model(x), want)


def test_load_rejects_shape_mismatch():
    _, lora = _adapted()
    sd = lora.to_comfy_state_dict()
    torch.manual_seed(0)
    wider = Net(dim=2 * DIM)
    target = LoRA(wider, LoRAConfig(rank=4, alpha=2.0))
    with pytest.raises(ValueError, match=r"do not fit the modules.*different model"):
        target.load_comfy_state_dict(sd)


def test_from_comfy_state_dict_errors():
    model, lora = _adapted(targets=("head",))
    with pytest.raises(ValueError, match="no 'diffusion_model.<module>.lora_down.weight' key"):
        LoRA.from_comfy_state_dict(model, lora.to_comfy_state_dict(prefix="unet"))
    sd = lora.to_comfy_state_dict()
    sd = {k.replace(".head.", ".blocks.0.norm."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="blocks.0.norm"):
        LoRA.from_comfy_state_dict(model, sd)


def test_save_is_atomic(tmp_path, monkeypatch):
    _, old = _adapted(rank=2, alpha=1.0)
    _, new = _adapted(rank=4, alpha=4.0)
    path = tmp_path / "adapter.safetensors"

    import branchgrpo.fileio as fileio

    def failing_fsync(fd):  # the data is written, the flush to disk fails
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(fileio.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_lora(path, new)
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file

    save_lora(path, old, metadata={"version": "old"})
    original = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(fileio.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_lora(path, new, metadata={"version": "new"})
    assert os.listdir(tmp_path) == ["adapter.safetensors"]
    assert path.read_bytes() == original
    assert load_lora_file(path)[1] == {"version": "old"}


def test_save_metadata_keys_must_be_strings(tmp_path):
    _, lora = _adapted(targets=("head",))
    with pytest.raises(TypeError, match="metadata keys"):
        save_lora(tmp_path / "a.safetensors", lora, metadata={1: "x"})  # type: ignore[dict-item]
