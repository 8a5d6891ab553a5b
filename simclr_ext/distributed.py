"""Cross-rank pieces of the contrastive loss under torch.distributed.

Each rank keeps its own queries and scores them against the keys of every rank. The gather must be
differentiable with the right backward: rank r's keys are used by the losses of *all* ranks, so the
gradient reaching them is the sum over ranks of each rank's gradient for that slice (an all-reduce
SUM, then the local slice). Returning only the local rank's own gradient slice, as lightly and
Spijkervet/SimCLR once did, drops every other rank's contribution.
"""
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_info", "all_gather_with_grad", "gather_pairs", "all_gather_no_grad"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> Tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """cat of x (R, D) from every rank along dim 0 -> (world * R, D); backward sums the incoming
    gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _check_equal_rows(rows: int, device: torch.device) -> None:
    """all_gather needs the same shape everywhere; a mismatch would otherwise hang or fail obscurely."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_info()[1])]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
    got = [int(c) for c in counts]
    if len(set(got)) != 1:
        raise ValueError(f"every rank must hold the same batch size for the gathered loss, got {got} (use drop_last)")


def all_gather_with_grad(x: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """x: (R, D) on every rank -> (world * R, D), rank r's rows at [r * R, (r + 1) * R), with gradients
    flowing back to every rank (summed over ranks). Identity outside torch.distributed."""
    if not is_distributed():
        return x
    if check_shapes:
        _check_equal_rows(x.shape[0], x.device)
    return _AllGather.apply(x)


def gather_pairs(z1: torch.Tensor, z2: torch.Tensor):
    """Queries, keys, labels and self_offset of NT-Xent with negatives from every rank.

    z1, z2: (N, D) this rank's two views. Queries are this rank's q = cat(z1, z2) (2N rows); keys are
    the (2N, D) q blocks of all ranks in rank order, so this rank's block starts at rank * 2N (the
    self_offset); labels are global sample ids (rank * N + i). Returns (q, keys, q_labels, k_labels,
    self_offset). With the mean over this rank's rows as its loss, the mean over ranks equals the
    single-process NT-Xent of the concatenated batch, and DDP's gradient averaging gives that loss's
    gradient.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D) of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    rank, _ = world_info()
    n = z1.shape[0]
    q = torch.cat([z1, z2], 0)
    keys = all_gather_with_grad(q)
    ids = torch.arange(n, device=z1.device)
    world = keys.shape[0] // (2 * n)
    k_labels = (ids.repeat(2).unsqueeze(0) + n * torch.arange(world, device=z1.device).unsqueeze(1)).reshape(-1)
    return q, keys, (ids + rank * n).repeat(2), k_labels, rank * 2 * n


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (R, ...) on every rank -> (world * R, ...) in rank order, without gradient (labels, ids).
    Identity outside torch.distributed."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_info()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)
