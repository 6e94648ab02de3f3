"""A compute device that is not the CPU, on a machine that has only a CPU: catches cross-device tensors.

A bug where a tensor is made on the CPU while the model is on CUDA (``torch.zeros(n)`` without ``device=``, a CPU
generator passed with ``device=``, ``.numpy()`` of a device tensor) shows up only on a GPU. Here every tensor the
run puts on the device is an :class:`Elsewhere`: a tensor subclass that reports ``device='meta'`` and carries its real
values on the CPU. Under :class:`ElsewhereMode` every operator sees its arguments first, and refuses, as CUDA does,
one that mixes an ``Elsewhere`` tensor with a CPU tensor of one or more dimensions (a 0-dim CPU tensor is a scalar
and mixes, as on CUDA; indices may be CPU tensors, as CUDA allows). Factory functions asked for the device
(``device=x.device``) make ``Elsewhere`` tensors; ``.to(device)`` / ``.to('cpu')`` are the explicit transfers.

Why not the alternatives: ``FakeTensorMode`` has no values, so a rollout, its rewards and ``.item()`` cannot run; a
bare ``meta`` device has no values either; a fake ``cuda`` device label makes autograd and optimizers initialise CUDA.
The ``meta`` label with real values behind it runs every phase.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
#: operators that take CPU index tensors with device tensors on CUDA too
INDEX_OPS = {"index.Tensor", "index_put_.default", "index_put.default", "_index_put_impl_.default",
             "index_select.default", "index_add_.default", "index_copy_.default", "scatter_.src",
             "gather.default"}
#: the explicit transfers between devices
TRANSFERS = {"_to_copy.default", "copy_.default"}


class CrossDevice(RuntimeError):
    """An operator got a device tensor and a CPU tensor (what CUDA refuses)."""


class Elsewhere(torch.Tensor):
    """A tensor on the device: reports ``meta``, holds its values (``elem``) on the CPU."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self):
        return f"Elsewhere({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: an Elsewhere tensor used outside ElsewhereMode")


def _is_device(dev) -> bool:
    return dev is not None and torch.device(dev).type == DEVICE.type


class ElsewhereMode(TorchDispatchMode):
    """Run operators on the CPU values of :class:`Elsewhere` tensors; refuse what mixes devices.
    ``ops`` counts the operators that touched the device."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        on_device, cpu = [], []

        def unwrap(t):
            if isinstance(t, Elsewhere):
                on_device.append(t)
                return t.elem
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                cpu.append(tuple(t.shape))
            return t

        a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        to_device = _is_device(k.get("device"))
        if to_device:
            gen = k.get("generator")
            if gen is not None and gen.device.type == "cpu":
                raise CrossDevice(f"{func}: a CPU generator for a tensor made on the device (make it on the CPU "
                                  "and move it, or use a generator of the device)")
            k["device"] = torch.device("cpu")
        if on_device and cpu and name not in TRANSFERS and name not in INDEX_OPS:
            raise CrossDevice(f"{func}: device tensors mixed with CPU tensors of shapes {cpu}")
        out = func(*a, **k)
        if on_device or to_device:
            self.ops += 1
        if name == "copy_.default":  # in place: the destination keeps its device
            return args[0]
        if name == "_to_copy.default":
            dev = kwargs.get("device")
            wrap = to_device or (dev is None and bool(on_device))
        else:
            wrap = bool(on_device) or to_device
        if not wrap:
            return out
        return tree_map(lambda t: Elsewhere(t) if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere)
                        else t, out)
