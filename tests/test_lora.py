"""Tests for branchgrpo.lora (module selection, config validation, atomic files) and the peft LoRA that
the engine trains through (:class:`~branchgrpo.peft_adapter.PeftAdapter`): outputs, gradients, the disabled
reference, checkpointing, dtypes, the ComfyUI keys."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from branchgrpo.lora import LoRAConfig, TrainableAdapter, load_lora_file, save_state_dict, select_linear
from branchgrpo.peft_adapter import PeftAdapter

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
    return Net(**kwargs).to(dtype).requires_grad_(False)


def randomize(lora: PeftAdapter, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(dtype: torch.dtype = torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def up_down(lora: PeftAdapter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = lora.layers[name]
    return layer.lora_B["default"].weight, layer.lora_A["default"].weight


# ---------------------------------------------------------------------- forward
def test_protocol_and_zero_init_leaves_outputs_unchanged():
    model, x = make(), inputs()
    base = model(x)
    lora = PeftAdapter(model, LoRAConfig(rank=4, alpha=8.0), dtype=torch.float64)
    assert isinstance(lora, TrainableAdapter)
    assert lora.names == ALL_LINEARS
    assert torch.equal(model(x), base)


def test_outputs_equal_merged_weights():
    model, x = make(), inputs()
    merged = make()
    lora = PeftAdapter(model, LoRAConfig(rank=3, alpha=6.0), dtype=torch.float64)
    randomize(lora)
    with torch.no_grad():
        for name in lora.names:
            up, down = up_down(lora, name)
            merged.get_submodule(name).weight += (up @ down) * 2.0  # alpha / rank
            torch.testing.assert_close(lora.delta(name).double(), (up @ down * 2.0).cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), merged(x), rtol=1e-10, atol=1e-10)


def test_gradients_reach_only_adapter_params():
    model, x = make(), inputs()
    lora = PeftAdapter(model, LoRAConfig(rank=2), dtype=torch.float64)
    model(x).square().mean().backward()
    mine = {id(p) for p in lora.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in mine)
    grads = dict((n, p.grad) for n, p in lora.named_parameters())
    assert len(grads) == 2 * len(ALL_LINEARS)
    # up (lora_B) starts at zero, so only the up matrices receive a gradient at step 0, but all of them.
    assert all(g is not None and torch.count_nonzero(g) > 0 for n, g in grads.items() if ".lora_B." in n)


def test_disabled_reproduces_base_and_restores_after_an_exception():
    model, x = make(), inputs()
    base = model(x)
    lora = PeftAdapter(model, LoRAConfig(rank=4), dtype=torch.float64)
    randomize(lora)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    with lora.disabled():
        assert torch.equal(model(x), base)
        with lora.disabled():  # nested
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.disabled():
            raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)  # re-enabled after the exception
    assert all(p.requires_grad for p in lora.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    x = inputs()
    grads = []
    for checkpointed in (None, reentrant):
        model = make(checkpointed=checkpointed)
        lora = PeftAdapter(model, LoRAConfig(rank=2), dtype=torch.float64)
        randomize(lora)
        # Reentrant checkpointing only tracks grads when an input of the segment requires grad.
        model(x.clone().requires_grad_(bool(checkpointed))).square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bf16_base_with_fp32_adapters():
    model, x = make(torch.bfloat16), inputs(torch.bfloat16)
    lora = PeftAdapter(model, LoRAConfig(rank=4))
    randomize(lora)
    assert all(p.dtype == torch.float32 for p in lora.parameters())
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # The adapter term itself is computed in fp32, then cast: compare against an fp32 reference.
    layer = model.head
    h = torch.randn(2, DIM, dtype=torch.bfloat16)
    with lora.disabled():
        base = layer(h)
    up, down = up_down(lora, "head")
    expected = (base.float() + h.float() @ (up @ down * lora.config.scale).T).to(torch.bfloat16)
    torch.testing.assert_close(layer(h), expected, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------- selection and config
def test_targets_and_exclude_globs():
    model = make()
    names = lambda **c: [n for n, _ in select_linear(model, LoRAConfig(**c))]  # noqa: E731
    assert names(targets=("blocks.*.attn.*",), exclude=("*.proj",)) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert names(targets=("*qkv", "head")) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "head"]
    assert names(targets=("blocks.1.mlp.*",)) == ["blocks.1.mlp.0", "blocks.1.mlp.2"]  # GELU is not a Linear
    assert names(exclude=("blocks.*",)) == ["embed", "head"]
    lora = PeftAdapter(model, LoRAConfig(targets=("*qkv",)))  # peft adapts exactly the selection
    assert lora.names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(model.blocks[0].attn.proj, nn.Linear)


def test_linear_subclasses_are_adapted():
    class CastLinear(nn.Linear):  # stands in for comfy.ops Linear
        pass

    root = nn.Sequential(CastLinear(4, 4), nn.ReLU())
    assert PeftAdapter(root, LoRAConfig(rank=2)).names == ["0"]


def test_no_match_error_lists_available_modules():
    with pytest.raises(ValueError, match=r"targets=\('\*to_q',\).*blocks\.0\.attn\.qkv"):
        PeftAdapter(make(), LoRAConfig(targets=("*to_q",)))
    with pytest.raises(ValueError, match="no nn.Linear"):
        PeftAdapter(nn.Sequential(nn.Conv2d(1, 1, 1)), LoRAConfig())


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
        PeftAdapter(make(), LoRAConfig(**kwargs))


def test_init_std():
    torch.manual_seed(0)
    root = nn.Linear(512, 512)
    lora = PeftAdapter(nn.Sequential(root), LoRAConfig(rank=64, init_std=0.02))
    assert abs(up_down(lora, "0")[1].std().item() - 0.02) < 0.002
    torch.manual_seed(0)
    default = PeftAdapter(nn.Sequential(nn.Linear(512, 512)), LoRAConfig(rank=64))
    bound = 1 / 512**0.5  # kaiming-uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    assert up_down(default, "0")[1].abs().max() <= bound


# ---------------------------------------------------------------------- ComfyUI format and files
def _adapted(rank: int = 4, alpha: float = 2.0, **config) -> tuple[Net, PeftAdapter]:
    model = make()
    lora = PeftAdapter(model, LoRAConfig(rank=rank, alpha=alpha, **config), dtype=torch.float64)
    randomize(lora)
    return model, lora


def test_comfy_keys_and_checkpoint_round_trip():
    model, lora = _adapted()
    sd = lora.comfy_state_dict()
    expected = {
        f"diffusion_model.{n}.{s}" for n in ALL_LINEARS for s in ("lora_up.weight", "lora_down.weight", "alpha")
    }
    assert set(sd) == expected
    up = sd["diffusion_model.blocks.0.attn.qkv.lora_up.weight"]
    down = sd["diffusion_model.blocks.0.attn.qkv.lora_down.weight"]
    assert up.shape == (3 * DIM, 4) and down.shape == (4, DIM)
    alpha = sd["diffusion_model.head.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in sd.values())
    sd["diffusion_model.head.lora_up.weight"].add_(1)  # a copy: the adapter is untouched
    assert not torch.equal(up_down(lora, "head")[0].float(), sd["diffusion_model.head.lora_up.weight"])

    state = lora.state_dict()
    assert len(state) == 2 * len(ALL_LINEARS) and all(".default." in k for k in state)
    _, other = _adapted()
    randomize(other, seed=5)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), other.parameters()))
    with pytest.raises(RuntimeError, match="does not fit"):
        _adapted(rank=3)[1].load_state_dict(state)


def test_file_round_trip_with_metadata(tmp_path):
    _, lora = _adapted(rank=3, alpha=1.5, targets=("*attn*",))
    path = tmp_path / "sub" / "adapter.safetensors"
    save_state_dict(path, lora.comfy_state_dict(), metadata={"base": "tiny", "step": 7, "cfg": {"lr": 1e-4}})
    assert os.listdir(path.parent) == ["adapter.safetensors"]  # no temp file left behind
    tensors, meta = load_lora_file(path)
    assert meta == {"base": "tiny", "step": "7", "cfg": '{"lr": 0.0001}'}
    reference = lora.comfy_state_dict()
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) and tensors[k].dtype == reference[k].dtype for k in reference)


def test_save_is_atomic(tmp_path, monkeypatch):
    old = _adapted(rank=2, alpha=1.0)[1].comfy_state_dict()
    new = _adapted(rank=4, alpha=4.0)[1].comfy_state_dict()
    path = tmp_path / "adapter.safetensors"

    import branchgrpo.fileio as fileio

    def failing_fsync(fd):  # the data is written, the flush to disk fails
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(fileio.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_state_dict(path, new)
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file

    save_state_dict(path, old, metadata={"version": "old"})
    original = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(fileio.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_state_dict(path, new, metadata={"version": "new"})
    assert os.listdir(tmp_path) == ["adapter.safetensors"]
    assert path.read_bytes() == original
    assert load_lora_file(path)[1] == {"version": "old"}


def test_save_metadata_keys_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="metadata keys"):
        save_state_dict(tmp_path / "a.safetensors", {"x": torch.zeros(1)}, metadata={1: "x"})  # type: ignore
