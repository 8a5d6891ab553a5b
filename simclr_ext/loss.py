"""NT-Xent and the general contrastive loss on top of the fused op (simclr_ext.ops).

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020, eq. (1):
the normalized temperature-scaled cross-entropy over the 2N augmented samples of a batch.
"""
import math
import numbers

import torch
from torch import nn

from . import distributed, ops

__all__ = ["contrastive_loss", "nt_xent", "NTXentLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_temperature(temperature, name="temperature"):
    """A float > 0, or a one-element floating tensor (returned 0-d, gradient kept: never read on the host)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{list(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {temperature.dtype}")
        return temperature.reshape(())
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be finite and > 0, got {temperature}")
    return float(temperature)


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_embeddings(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a feature dimension D > 0, got shape {list(x.shape)}")


def _check_labels(name, labels, length, device):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device}, got {labels.device}")
    return labels.long()


def _check_positive_weight(weight, q):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"positive_weight must be None or a floating tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.shape != (q.shape[0],) or weight.device != q.device:
        raise ValueError(f"positive_weight must have shape [{q.shape[0]}] on {q.device}, got "
                         f"{list(weight.shape)} on {weight.device}")
    if weight.requires_grad:
        raise ValueError("positive_weight is a constant of the fused op and must not require grad (detach it)")
    return weight


def _reduce(per_row, npos, reduction):
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    # Rows without a positive contribute 0 and do not count: an all-empty batch gives 0, not NaN.
    return per_row.sum() / (npos > 0).sum().clamp_min(1).to(per_row.dtype)


def contrastive_loss(q, k, q_labels, k_labels, temperature=0.1, self_offset=None, reduction="mean", allow_tf32=None,
                     exclude_positives=False, positive_weight=None):
    """Multi-positive contrastive loss over cosine similarities, fused (the M x L matrix is never built).

    Args:
        q: (M, D) queries. k: (L, D) keys, same dtype and device.
        q_labels: (M,), k_labels: (L,) integer labels; key j is a positive of query i when the labels
            match and j is not i's own key.
        temperature: the softmax temperature tau (> 0): a float, or a 0-d floating tensor (on the CPU or on
            q's device) that may require grad; its gradient comes out of the backward pass at no extra cost.
        self_offset: None, or the index in k of query 0 when the queries are rows
            [self_offset, self_offset + M) of the keys; a query's own key is then left out of both the
            positives and the denominator (SimCLR, SupCon, distributed gathers).
        reduction: "mean" over rows that have a positive, "sum", or "none" for the (M,) per-row losses.
        allow_tf32: CUDA only: use TF32 tensor cores for float32 inputs; None follows `set_tf32`.
        exclude_positives: leave the positives out of the denominator too (decoupled contrastive learning,
            Yeh et al. 2022): the log-sum-exp runs over the negatives only.
        positive_weight: None, or (M,) per-row weights w_i of the positive term (DCLW); constants: a tensor
            that requires grad is refused (detach it, or see DCLLoss for a differentiable weight).

    Returns:
        loss_i = logsumexp_{j != self(i)} s_ij - w_i mean_{j in P(i)} s_ij, s = cos(q_i, k_j) / temperature;
        rows without positives have loss 0. float32 for float16/bfloat16/float32 inputs, float64 for float64.

    With q = k = cat(z1, z2) and labels arange(N).repeat(2), self_offset=0 this is NT-Xent; with class
    labels it is the supervised contrastive loss (Khosla et al. 2020, L_out).
    """
    _check_embeddings("q", q)
    _check_embeddings("k", k)
    if k.dtype != q.dtype or k.device != q.device or k.shape[1] != q.shape[1]:
        raise ValueError(f"k must match q in dtype, device and D: q is {q.dtype} {list(q.shape)} on {q.device}, "
                         f"k is {k.dtype} {list(k.shape)} on {k.device}")
    q_labels = _check_labels("q_labels", q_labels, q.shape[0], q.device)
    k_labels = _check_labels("k_labels", k_labels, k.shape[0], q.device)
    temperature = _check_temperature(temperature)
    if isinstance(temperature, torch.Tensor) and temperature.device not in (torch.device("cpu"), q.device):
        raise ValueError(f"temperature must be on the CPU or on {q.device}, got {temperature.device}")
    positive_weight = _check_positive_weight(positive_weight, q)
    _check_reduction(reduction)
    if self_offset is None:
        offset = -1
    elif isinstance(self_offset, bool) or not isinstance(self_offset, numbers.Integral):
        raise TypeError(f"self_offset must be None or an int, got {type(self_offset).__name__}")
    elif not 0 <= self_offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"self_offset must be None or in [0, L - M] = [0, {k.shape[0] - q.shape[0]}], got {self_offset}")
    else:
        offset = int(self_offset)
    tf32 = ops.tf32_enabled() if allow_tf32 is None else bool(allow_tf32)
    per_row, _, npos = ops.ntxent_forward(q, k, q_labels, k_labels, temperature, offset, tf32,
                                          bool(exclude_positives), positive_weight)
    return _reduce(per_row, npos, reduction)


def _check_pair(z1, z2):
    _check_embeddings("z1", z1)
    _check_embeddings("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (N, D), got {list(z1.shape)} and {list(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    if z1.shape[0] == 0:
        raise ValueError("z1 and z2 must hold at least one sample (N >= 1), got an empty batch")


def nt_xent(z1, z2, temperature=0.5, reduction="mean", allow_tf32=None):
    """NT-Xent loss of SimCLR (Chen et al. 2020, eq. 1), fused.

    Args:
        z1, z2: (N, D) projections of two augmented views of the same N samples.
        temperature: tau, 0.5 by default (the paper's CIFAR-10 setting; lightly's default too).
        reduction: "mean" over the 2N anchors (the paper's loss), "sum", or "none" for (2N,) per-anchor
            losses (rows 0..N-1 are the anchors of z1, N..2N-1 those of z2).
        allow_tf32: CUDA only, see `contrastive_loss`.

    For each of the 2N anchors: -log softmax of its positive among the 2N - 1 other samples, with
    cosine similarity over temperature. Equals lightly's NTXentLoss(temperature) on the same inputs.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    labels = torch.arange(n, device=z.device).repeat(2)
    return contrastive_loss(z, z, labels, labels, temperature, self_offset=0, reduction=reduction,
                            allow_tf32=allow_tf32)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss as a module: `NTXentLoss(temperature=0.5)(z1, z2)`.

    Drop-in for lightly's `NTXentLoss(temperature, memory_bank_size, gather_distributed)`.

    Args:
        temperature: tau (> 0), default 0.5.
        memory_bank_size: 0 (default) or the number of past z2 projections kept as extra negatives,
            with labels no query has. Unlike lightly's memory-bank mode, the other samples of the batch
            stay negatives too: the bank only adds negatives to the SimCLR loss.
        gather_distributed: under torch.distributed, score this rank's 2N queries against the keys of
            every rank (negatives from the global batch); the gather's backward sums gradients across
            ranks. Each rank's loss is the mean over its own rows: their mean over ranks is the NT-Xent
            of the global batch. No effect outside an initialized process group.
        reduction: "mean" (default), "sum" or "none".
        allow_tf32: CUDA only, see `contrastive_loss`.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False, reduction="mean",
                 allow_tf32=None):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        _check_reduction(reduction)
        if isinstance(memory_bank_size, bool) or not isinstance(memory_bank_size, numbers.Integral) \
                or memory_bank_size < 0:
            raise ValueError(f"memory_bank_size must be an int >= 0, got {memory_bank_size!r}")
        self.memory_bank_size = int(memory_bank_size)
        self.gather_distributed = bool(gather_distributed)
        self.reduction = reduction
        self.allow_tf32 = allow_tf32
        # Ring buffer of past z2 projections (allocated at the first call, when D is known).
        self.register_buffer("bank", torch.empty(0), persistent=True)
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long), persistent=True)

    def extra_repr(self):
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"gather_distributed={self.gather_distributed}, reduction={self.reduction!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank's shape is only known once filled: take the saved one instead of failing on a size mismatch.
        saved = state_dict.get(prefix + "bank")
        if saved is not None:
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z1, z2):
        """z1, z2: (N, D) projections of the two views; returns the loss (a scalar unless reduction="none")."""
        gather = self.gather_distributed and distributed.is_distributed()
        if self.memory_bank_size == 0 and not gather:
            return nt_xent(z1, z2, self.temperature, self.reduction, self.allow_tf32)
        _check_pair(z1, z2)
        if gather:
            # Local queries against the keys of every rank (gradients summed back across ranks).
            z, keys, q_labels, k_labels, offset = distributed.gather_pairs(z1, z2)
        else:
            z = keys = torch.cat([z1, z2], dim=0)
            q_labels = k_labels = torch.arange(z1.shape[0], device=z.device).repeat(2)
            offset = 0
        if self.memory_bank_size:
            bank = self._bank_for(z1)
            # Bank entries get label -1, which no query has: negatives only.
            k_labels = torch.cat([k_labels, k_labels.new_full((bank.shape[0],), -1)])
            keys = torch.cat([keys, bank.to(z.dtype)], dim=0)
        loss = contrastive_loss(z, keys, q_labels, k_labels, self.temperature, self_offset=offset,
                                reduction=self.reduction, allow_tf32=self.allow_tf32)
        if self.memory_bank_size:
            self._enqueue(z2.detach())
        return loss

    def _bank_for(self, z):
        d = z.shape[1]
        if self.bank.numel() == 0:
            # Random unit vectors until real projections fill the ring, as in lightly and MoCo.
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            init = torch.randn(self.memory_bank_size, d, device=z.device, dtype=dtype)
            self.bank = nn.functional.normalize(init, dim=1)
        elif self.bank.shape[1] != d:
            raise ValueError(f"z1 has D={d} but the memory bank holds D={self.bank.shape[1]} projections")
        return self.bank.detach()

    @torch.no_grad()
    def _enqueue(self, z):
        size = self.memory_bank_size
        z = z[-size:].to(self.bank.dtype)
        ptr = int(self.bank_ptr)
        idx = (torch.arange(z.shape[0], device=self.bank.device) + ptr) % size
        self.bank[idx] = z
        self.bank_ptr.fill_((ptr + z.shape[0]) % size)
