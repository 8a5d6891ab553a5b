"""SigLIP's sigmoid image-text loss on the fused op (its sigmoid mode): the N x N logits are never built.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023: every image-text pair is a binary
classification, loss = -sum_ij log sigmoid(y_ij (logit_scale <image_i, text_j> + logit_bias)) / N with y = +1 on
the matched pairs and -1 elsewhere. The module is open_clip's `SigLipLoss(cache_labels, rank, world_size,
dist_impl)(image_features, text_features, logit_scale, logit_bias, output_dict)`; under torch.distributed the
other ranks' text features come to each rank as open_clip's dist_impl moves them (a ring of neighbour exchanges,
an all-reduce or an all-gather per step) and each step is one fused call: no rank holds more than its own
N x D blocks of features, whatever the world size.
"""
import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, ops
from .clip_loss import _check_features, _pair_labels, _temperature_of

__all__ = ["siglip_loss", "SigLipLoss"]

_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _bias_arg(logit_bias):
    """None, a finite number (any sign) or a one-element floating tensor (returned 0-d, gradient kept)."""
    if logit_bias is None:
        return None
    if isinstance(logit_bias, torch.Tensor):
        if logit_bias.numel() != 1:
            raise ValueError(f"logit_bias must be a number or a one-element tensor, got shape "
                             f"{list(logit_bias.shape)}")
        if not logit_bias.is_floating_point():
            raise TypeError(f"logit_bias must be a floating tensor, got {logit_bias.dtype}")
        return logit_bias.reshape(())
    if not isinstance(logit_bias, numbers.Real) or isinstance(logit_bias, bool):
        raise TypeError(f"logit_bias must be None, a real number or a tensor, got {type(logit_bias).__name__}")
    if not math.isfinite(logit_bias):
        raise ValueError(f"logit_bias must be finite, got {logit_bias}")
    return float(logit_bias)


def _block_sum(image, text, q_labels, k_labels, temperature, bias, normalize, allow_tf32):
    """sum_i of the sigmoid losses of this rank's images against one block of texts: one fused call."""
    per_row, _, _ = ops.ntxent(image, text, q_labels, k_labels, temperature, -1, ops.resolve_tf32(allow_tf32),
                               normalize=normalize, sigmoid=True, bias=bias)
    return per_row.sum(dtype=torch.float64)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, labels=None, normalize=False,
                allow_tf32=None):
    """SigLIP loss of one process, fused: -sum_ij log sigmoid(y_ij (logit_scale <x_i, t_j> + logit_bias)) / N.

    Args:
        image_features, text_features: (N, D), pair i matched; scored as given (open_clip), or L2-normalized
            inside with normalize=True.
        logit_scale: the scale, already exponentiated (a positive number or a one-element tensor, learnable).
        logit_bias: None (0), a number, or a one-element floating tensor (learnable).
        labels: None (y = +1 on pair i only), or (N,) integer classes: y = +1 on every pair with equal labels.
        allow_tf32: CUDA only, see `contrastive_loss`.

    Returns the scalar loss (float32 for 16- and 32-bit inputs, float64 for float64). Memory O(N * D).
    """
    _check_features(image_features, text_features)
    temperature = _temperature_of(logit_scale)
    bias = _bias_arg(logit_bias)
    pair_labels = _pair_labels(labels, image_features)
    total = _block_sum(image_features, text_features, pair_labels, pair_labels, temperature, bias, normalize,
                       allow_tf32)
    return (total / image_features.shape[0]).to(_loss_dtype(image_features))


def _loss_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Exchange(torch.autograd.Function):
    """Send `to_right` to the right neighbour and `to_left` to the left one (None: that direction idle) and
    receive from both, in one batch of point-to-point operations. The gradient of what was received goes back
    to where it came from by the same exchange, the directions swapped."""

    @staticmethod
    def forward(ctx, left, right, to_left, to_right):
        ctx.left, ctx.right = left, right
        ctx.has_left, ctx.has_right = to_left is not None, to_right is not None
        return _exchange(left, right, to_left, to_right)

    @staticmethod
    def backward(ctx, grad_from_left, grad_from_right):
        # The gradient of what came from the left goes back left, where it is the gradient of what that rank
        # sent right; likewise to the right. What arrives here is the gradient of what this rank sent.
        back_left = grad_from_left if ctx.has_right else None
        back_right = grad_from_right if ctx.has_left else None
        grad_to_left, grad_to_right = _exchange(ctx.left, ctx.right, back_left, back_right)
        return None, None, grad_to_left, grad_to_right


def _exchange(left, right, to_left, to_right):
    """(received from the left, received from the right); None for a direction nothing was sent in."""
    ops_, from_left, from_right = [], None, None
    if to_right is not None:
        from_left = torch.empty_like(to_right)
        ops_ += [dist.P2POp(dist.isend, to_right.contiguous(), right), dist.P2POp(dist.irecv, from_left, left)]
    if to_left is not None:
        from_right = torch.empty_like(to_left)
        ops_ += [dist.P2POp(dist.isend, to_left.contiguous(), left), dist.P2POp(dist.irecv, from_right, right)]
    for req in dist.batch_isend_irecv(ops_):
        req.wait()
    return from_left, from_right


def _ring_blocks(text, labels, rank, world, dist_impl):
    """The other ranks' (text block, labels) as open_clip's dist_impl brings them, one at a time (a generator: a
    block is released before the next arrives, as far as autograd allows)."""
    left, right = (rank - 1) % world, (rank + 1) % world
    if dist_impl == "shift":
        block, block_labels = text, labels
        for _ in range(world - 1):
            block, _ = _Exchange.apply(left, right, None, block)
            block_labels, _ = _exchange(left, right, None, block_labels)
            yield block, block_labels
        return
    # bidir: both directions at once, then one more step to the right for an even world size.
    to_left = to_right = text
    labels_left = labels_right = labels
    pairs, remainder = divmod(world - 1, 2)
    for _ in range(pairs):
        from_left, from_right = _Exchange.apply(left, right, to_left, to_right)
        labels_from_left, labels_from_right = _exchange(left, right, labels_left, labels_right)
        yield from_left, labels_from_left
        yield from_right, labels_from_right
        to_left, to_right = from_right, from_left
        labels_left, labels_right = labels_from_right, labels_from_left
    if remainder:
        from_left, _ = _Exchange.apply(left, right, None, to_right)
        labels_from_left, _ = _exchange(left, right, None, labels_right)
        yield from_left, labels_from_left


def _collective_blocks(text, labels, rank, world, dist_impl):
    """open_clip's 'reduce' (each rank's block by a differentiable all-reduce of a masked copy) and 'gather' (all
    blocks by a differentiable all-gather); the own block is skipped (open_clip multiplies its term by 0)."""
    all_labels = distributed.all_gather_no_grad(labels).reshape(world, -1)
    if dist_impl == "gather":
        blocks = distributed.all_gather_with_grad(text).reshape(world, *text.shape)
        for i in range(world):
            if i != rank:
                yield blocks[i], all_labels[i]
        return
    import torch.distributed.nn as dist_nn

    for i in range(world):
        block = dist_nn.all_reduce(text * float(rank == i), dist.ReduceOp.SUM)
        # The own block too (labels None: no loss term): each all-reduce's backward is a collective that every
        # rank must run, in the same order.
        yield block, (all_labels[i] if i != rank else None)


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss as a module, open_clip's constructor and call:
    `SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)
    (image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`.

    Equal to open_clip's `SigLipLoss` in value and in every gradient (features, logit_scale, logit_bias), on one
    process and for each dist_impl ("bidir" (default), "shift", "reduce", "gather") across ranks; memory O(N * D).

    Args (open_clip's meaning):
        cache_labels: accepted for open_clip's signature; the fused op builds no label matrix to cache.
        rank, world_size: this process's rank and the number of ranks; world_size > 1 exchanges the text
            features through the initialized default process group, which must agree with them.
        dist_impl: how the other ranks' texts arrive (open_clip's choices); the loss is the same for each.
    simclr_ext's own:
        normalize: False (default, open_clip): logits on the features as given; True: on L2-normalized rows.
        allow_tf32: CUDA only, see `contrastive_loss`.
    forward's labels: None, or (N,) integer classes of this rank's pairs: every image-text pair with equal
        labels (across ranks too) is a positive.
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *, normalize=False,
                 allow_tf32=None):
        super().__init__()
        distributed.check_rank_arguments(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.normalize = bool(normalize)
        self.allow_tf32 = allow_tf32

    def extra_repr(self):
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"normalize={self.normalize}")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, labels=None):
        """image_features, text_features: (N, D); logit_scale: exp of the learned log scale; logit_bias: None,
        a number or a one-element tensor; labels: None or (N,) classes. Returns the loss, or
        {"contrastive_loss": loss} with output_dict=True."""
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, labels, self.normalize,
                               self.allow_tf32)
        else:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias, labels)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image, text, logit_scale, logit_bias, labels):
        rank, world = distributed.world_info()
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) needs an initialized "
                             f"torch.distributed process group of that size and rank, got rank {rank} of {world}")
        _check_features(image, text)
        temperature = _temperature_of(logit_scale)
        bias = _bias_arg(logit_bias)
        n = image.shape[0]
        # Implicit labels are global pair ids: another rank's block then holds no positive of ours.
        own_labels = _pair_labels(labels, image) + (rank * n if labels is None else 0)
        total = _block_sum(image, text, own_labels, own_labels, temperature, bias, self.normalize, self.allow_tf32)
        source = _ring_blocks if self.dist_impl in ("bidir", "shift") else _collective_blocks
        for block, block_labels in source(text, own_labels, rank, world, self.dist_impl):
            if block_labels is None:
                total = total + 0 * block.sum(dtype=torch.float64)
                continue
            total = total + _block_sum(image, block, own_labels, block_labels, temperature, bias, self.normalize,
                                       self.allow_tf32)
        return (total / n).to(_loss_dtype(image))
