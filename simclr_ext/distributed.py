"""Cross-rank pieces of the contrastive loss under torch.distributed.

Each rank keeps its own queries and scores them against the keys of every rank. The gather must be
differentiable with the right backward: rank r's keys are used by the losses of *all* ranks, so the
gradient reaching them is the sum over ranks of each rank's gradient for that slice. One reduce-scatter
(SUM) computes exactly that and moves 1/W of the gathered gradient per rank, where an all-reduce followed
by slicing would move all of it. (A gather whose backward returns only the local rank's own slice drops
every other rank's contribution; lightly 1.6's GatherLayer all-reduces, so it sums across ranks.)
"""
from typing import Dict, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_info", "check_gather_available", "check_rank_arguments", "all_gather_with_grad",
           "all_gather_no_grad", "gather_pairs"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_rank_arguments(rank, world_size) -> None:
    """open_clip's explicit rank / world_size constructor arguments (ClipLoss, SigLipLoss), checked once."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"world_size must be >= 1 and rank in [0, world_size), got rank={rank}, "
                         f"world_size={world_size}")


def check_gather_available(gather_distributed: bool) -> None:
    """A loss asked to gather across ranks in a torch built without torch.distributed cannot ever do it: refused
    at construction with ValueError, as lightly 1.6 does (one `is_available()` call, only when asked to gather)."""
    if gather_distributed and not dist.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available in this torch build; "
                         "pass gather_distributed=False or install a torch with distributed support")


def world_info() -> Tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective(new: str, old: str):
    """torch >= 2.14 renamed the single-tensor collectives (the old names warn); same signatures."""
    return getattr(dist, new, None) or getattr(dist, old)


# Every rank's message has the same size, so a rank with another batch shape can never make the
# collective itself fail (gloo aborts the process on a size mismatch, NCCL hangs): each message is
# [shape header | rows padded or cut to the agreed size], and the headers say whether the shapes agree.
_HEADER = 3  # int64: rows, elements per row, dtype
_HEADER_BYTES = 8 * _HEADER
# Agreed payload bytes per rank, per (process group, world size, call site); grows, never shrinks.
_CAPACITY: Dict[tuple, int] = {}
# The groups those keys name, held so that a later group (after destroy_process_group) never reuses an id.
_GROUPS: Dict[int, object] = {}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _header(x: torch.Tensor) -> torch.Tensor:
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    return torch.tensor([x.shape[0], x[0].numel() if x.shape[0] else 0, code], dtype=torch.int64, device=x.device)


def _check_headers(headers: torch.Tensor) -> None:
    """headers: (world, 3), the same on every rank, so every rank raises or none does."""
    rows = headers.tolist()
    if any(row != rows[0] for row in rows):
        shapes = "; ".join(f"rank {r}: rows={h[0]}, D={h[1]}, dtype={_DTYPES[h[2]] if h[2] < len(_DTYPES) else 'other'}"
                           for r, h in enumerate(rows))
        raise ValueError("every rank must hold the same batch size, feature dimension and dtype for the "
                         f"gathered loss (use a DistributedSampler and drop_last=True), got {shapes}")


def _gather_rows(x: torch.Tensor, site: str) -> torch.Tensor:
    """cat over ranks of x (R, ...) -> (world * R, ...), shapes verified on every rank from the headers.

    One collective per call; the first call of a call site adds one fixed-size gather of the headers alone
    (the payload size is not agreed yet), and a batch larger than every earlier one gathers again."""
    world = world_info()[1]
    group = dist.group.WORLD
    _GROUPS[id(group)] = group
    key = (id(group), world, site)
    x = x.contiguous()
    header = _header(x)
    payload = x.reshape(-1).view(torch.uint8)
    gather = _collective("all_gather_single", "all_gather_into_tensor")
    if key not in _CAPACITY:
        headers = header.new_empty(world * _HEADER)  # flat: gloo insists on a plain concatenation
        gather(headers, header)
        _check_headers(headers.view(world, _HEADER))
        _CAPACITY[key] = payload.numel()
    cap = _CAPACITY[key]
    message = payload.new_zeros(_HEADER_BYTES + cap)
    message[:_HEADER_BYTES] = header.view(torch.uint8)
    used = min(cap, payload.numel())
    message[_HEADER_BYTES:_HEADER_BYTES + used] = payload[:used]
    gathered = message.new_empty(world * message.numel())
    gather(gathered, message)
    gathered = gathered.view(world, message.numel())
    _check_headers(gathered[:, :_HEADER_BYTES].contiguous().view(torch.int64))
    if payload.numel() > cap:  # every rank grew alike (the headers agree): once more at the new size
        _CAPACITY[key] = payload.numel()
        return _gather_rows(x, site)
    rows = gathered[:, _HEADER_BYTES:_HEADER_BYTES + payload.numel()].contiguous().view(x.dtype)
    return rows.reshape((world * x.shape[0],) + tuple(x.shape[1:]))


class _AllGather(torch.autograd.Function):
    """cat of x (R, D) from every rank along dim 0 -> (world * R, D); backward: reduce-scatter (SUM) of
    the incoming gradient, so each rank gets the sum over ranks of the gradients of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, site: str) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _gather_rows(x, site)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out, None


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (R, D) on every rank -> (world * R, D), rank r's rows at [r * R, (r + 1) * R), with gradients
    flowing back to every rank (summed over ranks by a reduce-scatter). Identity outside torch.distributed.

    Ranks whose shapes or dtypes differ get the same ValueError on every rank. The shapes travel in the
    gather's own message (no extra collective per step); reading them back is one small device-to-host
    copy (a sync on CUDA) per call."""
    if not is_distributed():
        return x
    return _AllGather.apply(x, "with_grad")


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (R, D) on every rank -> (world * R, D) in rank order, without gradient (memory-bank updates).
    Identity outside torch.distributed."""
    if not is_distributed():
        return x
    return _gather_rows(x, "no_grad")


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
