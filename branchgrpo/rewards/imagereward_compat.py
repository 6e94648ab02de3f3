"""Import the model code of the ``image-reward`` 1.5 package under today's libraries.

``image-reward`` (THUDM, 2023) is installed with ``pip install --no-deps image-reward==1.5``: its
metadata pins ``timm==0.6.13`` (which conflicts with open-clip-torch 3.x; the BLIP code gives the
same scores on timm 1.0) and pulls ``datasets``/``diffusers``/``accelerate`` for its training module,
and its package ``__init__`` imports ``clip`` (undeclared) for two unrelated baselines. The model
itself needs only ``torch``, ``timm``, ``fairscale`` and ``transformers``.

:func:`import_imagereward` therefore

1. loads only the model modules (``ImageReward.ImageReward``, ``models/BLIP/{blip_pretrain, blip,
   vit, med}``) as a private copy under the package name ``_branchgrpo_imagereward``, without running
   the package ``__init__`` files (no ``clip``, ``datasets``, ``ReFL``); a real ``import ImageReward``
   elsewhere in the process is unaffected;
2. before that import, puts back into ``transformers.modeling_utils`` the three helpers that BLIP's
   ``med.py`` imports from there and that transformers >= 4.57 no longer exports
   (``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``, ``prune_linear_layer``);
3. on transformers 5, adapts the private copy's ``BertPreTrainedModel`` (class attributes, nothing
   global): ``init_weights`` runs ``post_init`` first (transformers 5 needs the attributes it sets),
   and ``invert_attention_mask`` / ``get_head_mask``, removed from ``PreTrainedModel``, are restored
   with their transformers 4.x behaviour;
4. keeps the import's global side effects out: BLIP's ``warnings.filterwarnings("ignore")`` and
   ``transformers.logging.set_verbosity_error()`` are undone.

Forward and backward then match transformers 4.57 (checked on a development machine).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
import warnings
from types import SimpleNamespace
from typing import Optional

import torch

__all__ = ["import_imagereward", "install_transformers_helpers", "IMAGEREWARD_INSTALL_HINT", "ALIAS"]

ALIAS = "_branchgrpo_imagereward"
IMAGEREWARD_INSTALL_HINT = "pip install --no-deps image-reward==1.5 (plus timm, fairscale: see requirements.txt)"
_lock = threading.Lock()
_namespace: Optional[SimpleNamespace] = None


def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """transformers 4.x ``pytorch_utils.find_pruneable_heads_and_indices``."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


def _prune_linear_layer(layer: torch.nn.Linear, index: torch.LongTensor, dim: int = 0) -> torch.nn.Linear:
    """transformers 4.x ``pytorch_utils.prune_linear_layer``."""
    index = index.to(layer.weight.device)
    w = layer.weight.index_select(dim, index).detach().clone()
    b = None
    if layer.bias is not None:
        b = layer.bias.detach().clone() if dim == 1 else layer.bias[index].detach().clone()
    size = list(layer.weight.size())
    size[dim] = len(index)
    new = torch.nn.Linear(size[1], size[0], bias=layer.bias is not None).to(layer.weight.device)
    new.weight.requires_grad = False
    new.weight.copy_(w.contiguous())
    new.weight.requires_grad = True
    if b is not None:
        new.bias.requires_grad = False
        new.bias.copy_(b.contiguous())
        new.bias.requires_grad = True
    return new


def _apply_chunking_to_forward(forward_fn, chunk_size, chunk_dim, *input_tensors):
    """transformers 4.x ``pytorch_utils.apply_chunking_to_forward``."""
    if chunk_size > 0:
        size = input_tensors[0].shape[chunk_dim]
        if size % chunk_size != 0:
            raise ValueError(f"dimension {chunk_dim} ({size}) is not a multiple of chunk_size {chunk_size}")
        chunks = tuple(t.chunk(size // chunk_size, dim=chunk_dim) for t in input_tensors)
        return torch.cat(tuple(forward_fn(*c) for c in zip(*chunks)), dim=chunk_dim)
    return forward_fn(*input_tensors)


def install_transformers_helpers() -> list:
    """Put the three helpers BLIP's ``med.py`` imports back into ``transformers.modeling_utils`` where
    they are missing (transformers >= 4.57). Returns the names added (empty on old transformers)."""
    import transformers.modeling_utils as mu
    try:
        import transformers.pytorch_utils as pu
    except ImportError:  # pragma: no cover
        pu = None
    fallbacks = {"apply_chunking_to_forward": _apply_chunking_to_forward,
                 "find_pruneable_heads_and_indices": find_pruneable_heads_and_indices,
                 "prune_linear_layer": _prune_linear_layer}
    added = []
    for name, fallback in fallbacks.items():
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, None) or fallback)
            added.append(name)
    return added


# -- transformers 5: methods removed from PreTrainedModel that med.py's BertModel calls --------------

def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    if encoder_attention_mask.dim() == 3:
        ext = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        ext = encoder_attention_mask[:, None, None, :]
    else:
        raise ValueError(f"wrong shape for encoder_attention_mask {tuple(encoder_attention_mask.shape)}")
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _init_weights_v5(self):
    """transformers 5's ``init_weights`` needs attributes that only ``post_init`` sets; med.py calls
    ``init_weights`` directly (4.x style). ``post_init`` itself calls ``init_weights`` again."""
    from transformers import PreTrainedModel
    if "all_tied_weights_keys" not in self.__dict__:
        self.post_init()
    else:
        PreTrainedModel.init_weights(self)


def _transformers_major() -> int:
    import transformers
    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover
        return 5


def _adapt_med(med) -> None:
    from transformers import PreTrainedModel
    cls = med.BertPreTrainedModel
    if not hasattr(PreTrainedModel, "invert_attention_mask"):
        cls.invert_attention_mask = _invert_attention_mask
    if not hasattr(PreTrainedModel, "get_head_mask"):
        cls.get_head_mask = _get_head_mask
    if _transformers_major() >= 5:
        cls.init_weights = _init_weights_v5


def _package_dir() -> str:
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the ImageReward reward needs the 'image-reward' package: " + IMAGEREWARD_INSTALL_HINT)
    return list(spec.submodule_search_locations)[0]


def import_imagereward() -> SimpleNamespace:
    """The classes of the ``image-reward`` model, importable on transformers 4.x and 5.x.

    Returns a namespace with ``ImageReward``, ``MLP``, ``BLIP_Pretrain``, ``VisionTransformer``,
    ``BertModel``, ``BertConfig``, ``transform`` (the package's PIL preprocessing) and ``modules``.
    """
    global _namespace
    with _lock:
        if _namespace is not None:
            return _namespace
        root = _package_dir()
        missing = [m for m in ("timm", "fairscale") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"the ImageReward model code needs {', '.join(missing)} "
                              f"(pip install {' '.join(missing)}; see requirements.txt)")
        install_transformers_helpers()
        # Parent packages as bare namespaces: their __init__ files import clip / datasets / ReFL.
        for name, path in ((ALIAS, root), (ALIAS + ".models", os.path.join(root, "models"))):
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                pkg.__package__ = name
                sys.modules[name] = pkg
        import transformers
        verbosity = transformers.logging.get_verbosity()
        try:
            with warnings.catch_warnings():  # blip.py calls warnings.filterwarnings("ignore") at import
                med = importlib.import_module(ALIAS + ".models.BLIP.med")
                _adapt_med(med)
                vit = importlib.import_module(ALIAS + ".models.BLIP.vit")
                blip_pretrain = importlib.import_module(ALIAS + ".models.BLIP.blip_pretrain")
                ir = importlib.import_module(ALIAS + ".ImageReward")
        finally:
            transformers.logging.set_verbosity(verbosity)
        _namespace = SimpleNamespace(
            ImageReward=ir.ImageReward, MLP=ir.MLP, transform=ir._transform,
            BLIP_Pretrain=blip_pretrain.BLIP_Pretrain, VisionTransformer=vit.VisionTransformer,
            BertModel=med.BertModel, BertConfig=med.BertConfig,
            modules=SimpleNamespace(med=med, vit=vit, blip_pretrain=blip_pretrain, ImageReward=ir),
            package_dir=root,
        )
        return _namespace
