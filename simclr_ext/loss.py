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


def _reduce(per_row, npos, reduction, paired=False):
    """The row losses' sum or mean, accumulated in float64 and rounded once.

    paired: the rows are two views [z1; z2] of the same N samples (NT-Xent): row i and row i + N are added first
    (an addition of two numbers commutes exactly), then the N pair sums in index order, so that swapping the
    views (z2, z1), which swaps the halves, gives the same bits whenever the row losses are the same bits."""
    if reduction == "none":
        return per_row
    if paired:
        n = per_row.shape[0] // 2
        total = (per_row[:n] + per_row[n:]).sum(dtype=torch.float64)
    else:
        total = per_row.sum(dtype=torch.float64)
    if reduction == "mean":
        # Rows without a positive contribute 0 and do not count: an all-empty batch gives 0, not NaN.
        total = total / (npos > 0).sum().clamp_min(1)
    return total.to(per_row.dtype)


def contrastive_loss(q, k, q_labels, k_labels, temperature=0.1, self_offset=None, reduction="mean", allow_tf32=None,
                     exclude_positives=False, positive_weight=None, normalize=True):
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
        allow_tf32: CUDA only: True / False select the TF32 tensor-core or the exact fp32 path for float32
            inputs; None (default) follows PyTorch, `torch.get_float32_matmul_precision()` ("highest", the
            default: exact; "high" / "medium": TF32), unless `simclr_ext.set_tf32` overrides it.
        exclude_positives: leave the positives out of the denominator too (decoupled contrastive learning,
            Yeh et al. 2022): the log-sum-exp runs over the negatives only.
        positive_weight: None, or (M,) per-row weights w_i of the positive term (DCLW); constants: a tensor
            that requires grad is refused (detach it, or see DCLLoss for a differentiable weight).
        normalize: True (default): cosine similarities; False: dot products of the rows as given (for features
            the caller has normalized itself, or open_clip's unnormalized logits).

    Returns:
        loss_i = logsumexp_{j != self(i)} s_ij - w_i mean_{j in P(i)} s_ij, s = cos(q_i, k_j) / temperature;
        rows without positives have loss 0. float32 for float16/bfloat16/float32 inputs, float64 for float64.

    With q = k = cat(z1, z2) and labels arange(N).repeat(2), self_offset=0 this is NT-Xent; with class
    labels it is the supervised contrastive loss (Khosla et al. 2020, L_out).
    """
    _check_reduction(reduction)
    per_row, npos = _contrastive_rows(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32,
                                      exclude_positives, positive_weight, normalize)
    return _reduce(per_row, npos, reduction)


def _contrastive_rows(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, exclude_positives=False,
                      positive_weight=None, normalize=True):
    """`contrastive_loss`'s checks and op call: the (M,) row losses and positive counts, unreduced."""
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
    if self_offset is None:
        offset = -1
    elif isinstance(self_offset, bool) or not isinstance(self_offset, numbers.Integral):
        raise TypeError(f"self_offset must be None or an int, got {type(self_offset).__name__}")
    elif not 0 <= self_offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"self_offset must be None or in [0, L - M] = [0, {k.shape[0] - q.shape[0]}], "
                         f"got {self_offset}")
    else:
        offset = int(self_offset)
    tf32 = ops.resolve_tf32(allow_tf32)
    per_row, _, npos = ops.ntxent(q, k, q_labels, k_labels, temperature, offset, tf32,
                                  exclude_positives=bool(exclude_positives), positive_weight=positive_weight,
                                  normalize=bool(normalize))
    return per_row, npos


def _paired_loss(q, keys, q_labels, k_labels, temperature, self_offset, reduction, allow_tf32, **op_args):
    """A loss whose query rows are this rank's two views [z1; z2] (NT-Xent, DCL): `contrastive_loss` reduced
    pairwise (`_reduce`), so that loss(z1, z2) and loss(z2, z1) agree to the bit whenever the row losses do."""
    _check_reduction(reduction)
    per_row, npos = _contrastive_rows(q, keys, q_labels, k_labels, temperature, self_offset, allow_tf32, **op_args)
    return _reduce(per_row, npos, reduction, paired=True)


def _check_pair(z1, z2):
    """Checks the two views and returns them in their common floating dtype: under autocast one branch may
    come out bfloat16 and the other (a momentum encoder, a cast) float32; both are then computed in float32,
    as torch's own binary ops would promote them."""
    _check_embeddings("z1", z1)
    _check_embeddings("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (N, D), got {list(z1.shape)} and {list(z2.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    if z1.shape[0] == 0:
        raise ValueError("z1 and z2 must hold at least one sample (N >= 1), got an empty batch")
    if z1.dtype != z2.dtype:
        dtype = torch.promote_types(z1.dtype, z2.dtype)
        z1, z2 = z1.to(dtype), z2.to(dtype)
    return z1, z2


def nt_xent(z1, z2, temperature=0.5, reduction="mean", allow_tf32=None):
    """NT-Xent loss of SimCLR (Chen et al. 2020, eq. 1), fused.

    Args:
        z1, z2: (N, D) projections of two augmented views of the same N samples; different floating dtypes
            are promoted to the common one (torch.promote_types).
        temperature: tau, 0.5 by default (the paper's CIFAR-10 setting; lightly's default too).
        reduction: "mean" over the 2N anchors (the paper's loss), "sum", or "none" for (2N,) per-anchor
            losses (rows 0..N-1 are the anchors of z1, N..2N-1 those of z2).
        allow_tf32: CUDA only, see `contrastive_loss`.

    For each of the 2N anchors: -log softmax of its positive among the 2N - 1 other samples, with
    cosine similarity over temperature. Equals lightly's NTXentLoss(temperature) on the same inputs.
    The loss is float32 for float16 / bfloat16 / float32 inputs and float64 for float64 (after promotion).
    """
    z1, z2 = _check_pair(z1, z2)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    labels = torch.arange(n, device=z.device).repeat(2)
    return _paired_loss(z, z, labels, labels, temperature, 0, reduction, allow_tf32)


_BANK_MODES = ("bank_only", "batch_and_bank")


def _check_bank_size(memory_bank_size):
    """(size, dim or None) from lightly's forms: 0, an int K (dim taken from the first batch), or (K, dim)."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(memory_bank_size) and memory_bank_size >= 0:
        return int(memory_bank_size), None
    if isinstance(memory_bank_size, (tuple, list)) and len(memory_bank_size) == 2 \
            and all(is_int(v) for v in memory_bank_size) and memory_bank_size[0] >= 0 and memory_bank_size[1] >= 1:
        return int(memory_bank_size[0]), int(memory_bank_size[1])
    raise ValueError(f"memory_bank_size must be an int >= 0 or a (size, dim) tuple of ints with size >= 0 and "
                     f"dim >= 1 (lightly's form), got {memory_bank_size!r}")


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss as a module: `NTXentLoss(temperature=0.5)(z1, z2)`.

    Drop-in for lightly's `NTXentLoss(temperature, memory_bank_size, gather_distributed)` (lightly 1.6):
    the same values and gradients, with or without a memory bank, and a model that held lightly's loss
    loads strictly (see the state_dict note below).

    Args:
        temperature: tau (> 0), default 0.5.
        memory_bank_size: 0 (default: no bank), lightly's `(size, dim)` tuple, or an int `size` (the
            dimension is then taken from the first batch). With a bank, as in lightly (and MoCo), each of
            the N rows of z1 is scored against its positive z2 row and the `size` bank entries as negatives
            (memory_bank_mode="bank_only"); the loss is the mean over those N rows. The bank starts as
            random unit vectors (lightly's initialisation, drawn from torch's global generator at
            construction for the tuple form) and holds normalized z2 rows, float32, as a ring: each update
            writes the batch at the pointer, and a batch reaching the end fills it and drops its remaining
            rows (lightly's rule; pick size a multiple of the global batch to use every row).
        gather_distributed: under torch.distributed, without a bank: score this rank's 2N queries against
            the keys of every rank (negatives from the global batch); the gather's backward sums gradients
            across ranks with a reduce-scatter. Each rank's loss is the mean over its own rows: their mean
            over ranks is the NT-Xent of the global batch. With a bank: the bank is updated with the z2 rows
            of every rank (all ranks keep the same bank), the loss stays local. No effect outside an
            initialized process group.
        reduction: "mean" (default), "sum" or "none".
        allow_tf32: CUDA only, see `contrastive_loss` (None follows torch.get_float32_matmul_precision()).
        memory_bank_mode: "bank_only" (default, lightly's and MoCo's loss) or "batch_and_bank": the full
            NT-Xent over the 2N samples of the batch with the bank entries added as extra negatives of every
            anchor (mean over the 2N anchors).

    The bank is updated only by a forward pass that will be backpropagated: in training mode, under grad
    mode, and when z1 requires grad (lightly's rule is the last two; this module also skips `eval()`, like
    BatchNorm's running statistics). Validation under `torch.no_grad()` leaves it unchanged.

    The bank and its pointer are buffers (saved in the state_dict, so a resumed run continues with the
    same negatives) only when a bank is configured. Loading a state_dict without them, e.g. one saved from a
    model that held lightly's NTXentLoss (whose bank is not persistent), keeps this module's bank as it is
    and is accepted by a strict load.

    Inputs of different floating dtypes are promoted to the common one (a bfloat16 branch under autocast
    beside a float32 momentum branch computes in float32). The loss is float32 for float16 / bfloat16 /
    float32 inputs and float64 for float64.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False, reduction="mean",
                 allow_tf32=None, memory_bank_mode="bank_only"):
        super().__init__()
        checked = _check_temperature(temperature)
        # A tensor is kept as given: an nn.Parameter registers with this module and is trained.
        self.temperature = temperature if isinstance(temperature, torch.Tensor) else checked
        _check_reduction(reduction)
        if allow_tf32 is not None and not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True, False or None, got {allow_tf32!r}")
        if memory_bank_mode not in _BANK_MODES:
            raise ValueError(f"memory_bank_mode must be one of {_BANK_MODES}, got {memory_bank_mode!r}")
        self.memory_bank_size, self.memory_bank_dim = _check_bank_size(memory_bank_size)
        self.memory_bank_mode = memory_bank_mode
        distributed.check_gather_available(gather_distributed)
        self.gather_distributed = bool(gather_distributed)
        self.reduction = reduction
        self.allow_tf32 = allow_tf32
        if self.memory_bank_size:
            if self.memory_bank_dim is None:
                bank = torch.empty(0)  # allocated by the first batch, when D is known
            else:
                bank = _random_unit_rows(self.memory_bank_size, self.memory_bank_dim, torch.float32, "cpu")
            self.register_buffer("bank", bank)
            self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self):
        bank = ""
        if self.memory_bank_size:
            size = self.memory_bank_size
            if self.memory_bank_dim is not None:
                size = (size, self.memory_bank_dim)
            bank = (f", memory_bank_size={size}, "
                    f"memory_bank_mode={self.memory_bank_mode!r}")
        return (f"temperature={self.temperature}{bank}, gather_distributed={self.gather_distributed}, "
                f"reduction={self.reduction!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = (prefix + "bank", prefix + "bank_ptr")
        saved = state_dict.get(keys[0])
        if saved is not None and self.memory_bank_size and self.memory_bank_dim is None:
            # A bank sized by its first batch: take the saved shape instead of failing on a size mismatch.
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not any(k in state_dict for k in keys):
            # No bank in the checkpoint (lightly never saves one): keep ours, as lightly would.
            missing_keys[:] = [k for k in missing_keys if k not in keys]

    def forward(self, z1, z2):
        """z1, z2: (N, D) projections of the two views; returns the loss (a scalar unless reduction="none":
        (2N,) per-anchor losses, or (N,) with a bank in "bank_only" mode)."""
        z1, z2 = _check_pair(z1, z2)
        gather = self.gather_distributed and distributed.is_distributed()
        if self.memory_bank_size == 0:
            if not gather:
                return nt_xent(z1, z2, self.temperature, self.reduction, self.allow_tf32)
            # Local queries against the keys of every rank (gradients summed back across ranks).
            q, keys, q_labels, k_labels, offset = distributed.gather_pairs(z1, z2)
            return _paired_loss(q, keys, q_labels, k_labels, self.temperature, offset, self.reduction,
                               self.allow_tf32)
        update = self.training and torch.is_grad_enabled() and z1.requires_grad
        bank = self._bank_for(z1)
        if self.memory_bank_mode == "bank_only":
            loss = _bank_only_loss(z1, z2, bank, self.temperature, self.reduction)
        else:
            if gather:
                q, keys, q_labels, k_labels, offset = distributed.gather_pairs(z1, z2)
            else:
                q = keys = torch.cat([z1, z2])
                q_labels = k_labels = torch.arange(z1.shape[0], device=z1.device).repeat(2)
                offset = 0
            bank_labels = torch.full((bank.shape[0],), -1, dtype=torch.long, device=z1.device)  # no query has -1
            keys = torch.cat([keys, bank])
            k_labels = torch.cat([k_labels, bank_labels])
            loss = contrastive_loss(q, keys, q_labels, k_labels, self.temperature, self_offset=offset,
                                    reduction=self.reduction, allow_tf32=self.allow_tf32)
        if update:
            new = nn.functional.normalize(z2.detach(), dim=1)
            if self.gather_distributed:
                new = distributed.all_gather_no_grad(new)
            self._enqueue(new)
        return loss

    def _bank_for(self, z):
        """The bank as keys for z: a detached copy, (size, D) in z's dtype and device (the update after the
        loss writes the bank in place; a graph that saved it must keep this step's rows)."""
        d = z.shape[1]
        if self.bank.numel() == 0:
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            self.bank = _random_unit_rows(self.memory_bank_size, d, dtype, z.device)
        elif self.bank.shape[1] != d:
            raise ValueError(f"z1 and z2 have D={d} but the memory bank holds D={self.bank.shape[1]} rows "
                             f"(memory_bank_size={(self.memory_bank_size, self.bank.shape[1])})")
        if self.bank.device != z.device:
            # Follow the data once (lightly moves the negatives every step).
            self.bank, self.bank_ptr = self.bank.to(z.device), self.bank_ptr.to(z.device)
        return self.bank.detach().to(z.dtype, copy=True)

    @torch.no_grad()
    def _enqueue(self, rows):
        """Writes rows at the pointer; a batch reaching the end fills it, drops the rest and resets the
        pointer to 0 (lightly's MemoryBankModule rule, so both banks hold the same rows)."""
        size = self.memory_bank_size
        ptr = int(self.bank_ptr)
        take = min(rows.shape[0], size - ptr)
        self.bank[ptr:ptr + take] = rows[:take].to(self.bank.dtype)
        self.bank_ptr.fill_(0 if ptr + rows.shape[0] >= size else ptr + take)


def _bank_only_loss(z1, z2, bank, temperature, reduction):
    """lightly's / MoCo's memory-bank loss: row i of z1 against its positive z2[i] and the bank's negatives.

    Each row has its own single positive and the other rows of z2 are not in its denominator, which the
    fused op (one key set shared by every query, only a query's own key excluded) cannot express: this is
    the plain cross-entropy over the (N, 1 + size) cosine logits, as lightly computes it."""
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    with torch.autocast(z1.device.type, enabled=False):  # float32 logits, as the fused op computes them
        q = nn.functional.normalize(z1.to(acc), dim=1)
        pos = (q * nn.functional.normalize(z2.to(acc), dim=1)).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, q @ bank.to(acc).T], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return nn.functional.cross_entropy(logits, target, reduction=reduction)


def _random_unit_rows(size, dim, dtype, device):
    """lightly's (and MoCo's) initial bank: normal draws from torch's global generator, normalized rows."""
    return nn.functional.normalize(torch.randn(size, dim, dtype=dtype, device=device), dim=-1)
