"""Process-group plumbing for the trainer. A single process needs none of it (:class:`SingleProcess`).

Under ``torchrun`` (:class:`TorchDistributed`): each rank samples whole trees (the prompts of an
iteration are dealt round-robin to ranks, each tree with its own seeded generator, so a tree is the
same whichever rank samples it); leaf rewards are all-gathered for the metrics and for statistics
that span the batch (GRPO's global std); edge counts are all-reduced so the loss is normalised by the
global number of trained edges; adapter gradients are all-reduced (summed: each rank's loss is
already divided by the global count) before clipping and the optimizer step, which is what DDP does.
"""
from __future__ import annotations

from typing import Sequence

import torch


class SingleProcess:
    rank = 0
    world_size = 1

    def is_main(self) -> bool:
        return True

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_sum(self, value: float) -> float:
        return value

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        pass

    def barrier(self) -> None:
        pass


class TorchDistributed(SingleProcess):
    """Wraps an initialised ``torch.distributed`` default process group (gloo or NCCL)."""

    def __init__(self, device: torch.device | str | None = None):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; launch with torchrun")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device(device) if device is not None else \
            (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))

    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor from every rank in rank order (sizes may differ)."""
        t = t.detach().to(self.device, torch.float64).flatten()
        n = torch.tensor([t.numel()], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, n)
        top = int(max(int(s) for s in sizes))
        padded = torch.zeros(top, dtype=t.dtype, device=self.device)
        padded[: t.numel()] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).cpu()

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return float(t)

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self.dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
            offset += n

    def barrier(self) -> None:
        self.dist.barrier()
