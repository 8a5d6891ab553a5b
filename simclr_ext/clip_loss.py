"""CLIP's symmetric image-text contrastive loss on the fused op: the N x N logits are never built.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021:
the mean of the image->text and text->image cross-entropies over the logits logit_scale * <image_i, text_j>.
The module is open_clip's `ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size)` with its call
`(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`; the features are scored as
given (dot products, as open_clip does), or L2-normalized inside with `normalize=True`.
"""
import torch
from torch import nn

from . import distributed, ops
from .loss import _check_embeddings, _check_labels, _check_temperature, _reduce

__all__ = ["clip_loss", "ClipLoss"]


def _check_features(image_features, text_features):
    _check_embeddings("image_features", image_features)
    _check_embeddings("text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError("image_features and text_features must both be (N, D) with the same N and D (pair i is "
                         f"image i with text i), got {list(image_features.shape)} and {list(text_features.shape)}")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features and text_features must have the same dtype, got {image_features.dtype} "
                        f"and {text_features.dtype}")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features and text_features must be on the same device, got "
                         f"{image_features.device} and {text_features.device}")
    if image_features.shape[0] == 0:
        raise ValueError("image_features and text_features must hold at least one pair (N >= 1), got N = 0")


def _temperature_of(logit_scale):
    """1 / logit_scale, differentiable when logit_scale is a tensor (never read on the host)."""
    scale = _check_temperature(logit_scale, "logit_scale")
    return 1.0 / scale if isinstance(scale, torch.Tensor) else _check_temperature(1.0 / scale, "1 / logit_scale")


def _pair_labels(labels, image_features):
    """The pairs' labels: arange(N) (pair i is the only positive of image i and text i) or the caller's classes
    (every pair with equal labels is a positive)."""
    n = image_features.shape[0]
    if labels is None:
        return torch.arange(n, device=image_features.device)
    return _check_labels("labels", labels, n, image_features.device)


def _with_bias_gradient(loss, logit_bias):
    """open_clip adds logit_bias to every logit; a constant added to a whole row of a softmax changes neither the
    loss nor any other gradient, and its own gradient is 0: the same graph, computed exactly."""
    if logit_bias is None:
        return loss
    if isinstance(logit_bias, torch.Tensor):
        return loss + 0 * logit_bias.reshape(()).to(loss.dtype)
    return loss


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, gather_distributed=False,
              allow_tf32=None, normalize=False, labels=None):
    """CLIP loss, fused: (CE(image -> text) + CE(text -> image)) / 2 over the N pairs.

    Args:
        image_features, text_features: (N, D); pair i (image i, text i) is the positive of both.
        logit_scale: the scale of the similarities, already exponentiated (CLIP's `logit_scale.exp()`, 1 / tau):
            a positive number or a one-element floating tensor that may require grad.
        logit_bias: None, or a constant added to every logit as open_clip allows; the softmax loss does not
            depend on it (its gradient is 0).
        gather_distributed: under torch.distributed, this rank's queries are scored against every rank's
            keys in both directions (open_clip's local_loss=True, gather_with_grad=True).
        allow_tf32: CUDA only, see `contrastive_loss`.
        normalize: False (default, open_clip): logits = logit_scale * image_features @ text_features.T on the
            features as given; True: on their L2-normalized rows (cosine similarities).
        labels: None (pair i alone is positive), or (N,) integer classes: every image-text pair with equal
            labels is a positive (duplicate captions, same-class pairs), each direction's loss the mean over
            a row's positives as in SupCon.

    Returns the scalar loss (float32 for 16- and 32-bit inputs, float64 for float64). Memory O(N * D).
    """
    _check_features(image_features, text_features)
    temperature = _temperature_of(logit_scale)
    pair_labels = _pair_labels(labels, image_features)
    if gather_distributed and distributed.is_distributed():
        rank, world = distributed.world_info()
        loss = _local_loss_gathered(image_features, text_features, pair_labels, labels is None, rank, world,
                                    temperature, True, normalize, allow_tf32)
    else:
        loss = _two_way(image_features, text_features, pair_labels, temperature, normalize, allow_tf32)
    return _with_bias_gradient(loss, logit_bias)


def _two_way(image, text, labels, temperature, normalize, allow_tf32):
    """One op call, both directions: the image rows' and the text columns' losses from the same tiles."""
    per_row, _, npos = ops.ntxent(image, text, labels, labels, temperature, -1, ops.resolve_tf32(allow_tf32),
                                  two_way=True, normalize=normalize)
    return _reduce(per_row, npos, "mean")


def _one_way(q, keys, q_labels, k_labels, temperature, normalize, allow_tf32):
    per_row, _, npos = ops.ntxent(q, keys, q_labels, k_labels, temperature, -1, ops.resolve_tf32(allow_tf32),
                                  normalize=normalize)
    return _reduce(per_row, npos, "mean")


def _gather(x, with_grad, keep_own_grad, rank):
    """Every rank's rows in rank order. with_grad: the gather's backward sums the ranks' gradients (open_clip's
    gather_with_grad, torch.distributed.nn.all_gather). Without: a constant, except this rank's own slice when
    keep_own_grad (open_clip's local_loss=False puts the local features back there)."""
    if with_grad:
        return distributed.all_gather_with_grad(x)
    gathered = distributed.all_gather_no_grad(x)
    if not keep_own_grad:
        return gathered
    n = x.shape[0]
    return torch.cat([gathered[:rank * n], x, gathered[(rank + 1) * n:]])


def _gathered_labels(pair_labels, implicit, rank, world, n):
    """Labels of the gathered pairs: global pair ids rank * N + i (no communication), or the gathered classes."""
    if implicit:
        return torch.arange(world * n, device=pair_labels.device)
    return distributed.all_gather_no_grad(pair_labels)


def _local_loss_gathered(image, text, pair_labels, implicit, rank, world, temperature, with_grad, normalize,
                         allow_tf32):
    """open_clip's local_loss=True: this rank's images against every rank's texts and its texts against every
    rank's images, the mean over this rank's rows of each direction, averaged."""
    n = image.shape[0]
    all_image, all_text = _gather(image, with_grad, False, rank), _gather(text, with_grad, False, rank)
    k_labels = _gathered_labels(pair_labels, implicit, rank, world, n)
    q_labels = pair_labels + rank * n if implicit else pair_labels
    image_to_text = _one_way(image, all_text, q_labels, k_labels, temperature, normalize, allow_tf32)
    text_to_image = _one_way(text, all_image, q_labels, k_labels, temperature, normalize, allow_tf32)
    return (image_to_text + text_to_image) / 2


def _global_loss_gathered(image, text, pair_labels, implicit, rank, world, temperature, with_grad, normalize,
                          allow_tf32):
    """open_clip's local_loss=False: every rank computes the loss of the whole global batch (both directions over
    all the gathered pairs, one two-way call)."""
    n = image.shape[0]
    all_image, all_text = _gather(image, with_grad, True, rank), _gather(text, with_grad, True, rank)
    labels = _gathered_labels(pair_labels, implicit, rank, world, n)
    return _two_way(all_image, all_text, labels, temperature, normalize, allow_tf32)


class ClipLoss(nn.Module):
    """CLIP's contrastive loss as a module, open_clip's constructor and call:
    `ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1)
    (image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`.

    Equal to open_clip's `ClipLoss` for any features, in value and in every gradient (logit_scale's included),
    with memory O(N * D) instead of the N x N logits.

    Args (open_clip's meaning):
        local_loss: with world_size > 1, each rank's loss is over its own rows against the gathered features
            (False: every rank computes the loss of the whole global batch).
        gather_with_grad: the gathered features carry gradients back to their ranks (False: a constant gather,
            the local features put back in their slot when local_loss is False).
        cache_labels: accepted for open_clip's signature; the labels are built inside the fused op, so there
            is nothing to cache.
        rank, world_size: this process's rank and the number of ranks; world_size > 1 gathers through the
            initialized default process group, which must agree with them.
        use_horovod: refused when True (horovod's collectives are not supported; use torch.distributed).
    simclr_ext's own:
        gather_distributed: local_loss=True, gather_with_grad=True with the rank and world size read from the
            process group (no effect outside one).
        allow_tf32: CUDA only, see `contrastive_loss`.
        normalize: False (default): open_clip's logits on the features as given; True: on L2-normalized rows.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, gather_distributed=False, allow_tf32=None, normalize=False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by simclr_ext's ClipLoss: gather through "
                             "torch.distributed (use_horovod=False, rank and world_size of the process group)")
        distributed.check_rank_arguments(rank, world_size)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = False
        self.gather_distributed = bool(gather_distributed)
        self.allow_tf32 = allow_tf32
        self.normalize = bool(normalize)

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, gather_distributed={self.gather_distributed}, "
                f"normalize={self.normalize}")

    def _check_group(self):
        rank, world = distributed.world_info()
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(f"ClipLoss(rank={self.rank}, world_size={self.world_size}) needs an initialized "
                             f"torch.distributed process group of that size and rank, got rank {rank} of {world}")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, labels=None):
        """image_features, text_features: (N, D); logit_scale: exp of the learned log scale (1 / tau); labels:
        None or (N,) classes (multi-positive, see `clip_loss`). Returns the loss, or {"contrastive_loss": loss}
        with output_dict=True."""
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, self.gather_distributed,
                             self.allow_tf32, self.normalize, labels)
        else:
            self._check_group()
            _check_features(image_features, text_features)
            temperature = _temperature_of(logit_scale)
            pair_labels = _pair_labels(labels, image_features)
            gathered = _local_loss_gathered if self.local_loss else _global_loss_gathered
            loss = gathered(image_features, text_features, pair_labels, labels is None, self.rank, self.world_size,
                            temperature, self.gather_with_grad, self.normalize, self.allow_tf32)
            loss = _with_bias_gradient(loss, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
