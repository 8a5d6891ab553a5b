"""CLIP's symmetric image-text contrastive loss on the fused op: the N x N logits are never built.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021:
the mean of the image->text and text->image cross-entropies over the cosine similarities scaled by a
learned logit scale. The call is open_clip's `ClipLoss()(image_features, text_features, logit_scale)`.
"""
import torch
from torch import nn

from . import distributed, ops
from .loss import _check_embeddings, _check_temperature, contrastive_loss

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


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, gather_distributed=False,
              allow_tf32=None):
    """CLIP loss, fused: (CE(image -> text) + CE(text -> image)) / 2 over the N pairs.

    Args:
        image_features, text_features: (N, D); pair i (image i, text i) is the only positive of both.
            Both are L2-normalized inside (open_clip's models normalize them before the loss, so the
            value and the gradients reaching the model are open_clip's).
        logit_scale: the scale of the cosines, already exponentiated (CLIP's `logit_scale.exp()`, 1 / tau):
            a positive number or a one-element floating tensor that may require grad.
        logit_bias: SigLIP's bias; refused (SigLIP is a sigmoid loss, not this softmax one).
        gather_distributed: under torch.distributed, this rank's queries are scored against every rank's
            keys in both directions; each rank returns the mean over its own pairs (the mean over ranks is
            the loss of the global batch; DDP's gradient averaging gives its gradient).
        allow_tf32: CUDA only, see `contrastive_loss`.

    Returns the scalar loss (float32 for 16- and 32-bit inputs, float64 for float64). Memory O(N * D).
    """
    if logit_bias is not None:
        raise ValueError("logit_bias is not supported: it belongs to SigLIP's sigmoid loss "
                         "(open_clip's SigLipLoss), not to the softmax CLIP loss; pass logit_bias=None")
    _check_features(image_features, text_features)
    temperature = _temperature_of(logit_scale)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device)
    if not (gather_distributed and distributed.is_distributed()):
        # One op call, both directions: the image rows' and the text columns' losses from the same tiles.
        per_row, _, _ = ops.ntxent(image_features, text_features, labels, labels, temperature, -1,
                                           ops.resolve_tf32(allow_tf32), two_way=True)
        return per_row.mean()
    # This rank's images against every rank's texts, and its texts against every rank's images: the other
    # ranks' column sums are not here, so each direction is its own call.
    rank, world = distributed.world_info()
    all_text = distributed.all_gather_with_grad(text_features)
    all_image = distributed.all_gather_with_grad(image_features)
    q_labels, k_labels = labels + rank * n, torch.arange(world * n, device=labels.device)
    image_to_text = contrastive_loss(image_features, all_text, q_labels, k_labels, temperature,
                                     allow_tf32=allow_tf32)
    text_to_image = contrastive_loss(text_features, all_image, q_labels, k_labels, temperature,
                                     allow_tf32=allow_tf32)
    return (image_to_text + text_to_image) / 2


class ClipLoss(nn.Module):
    """CLIP's contrastive loss as a module, open_clip's call:
    `ClipLoss()(image_features, text_features, logit_scale, output_dict=False)`.

    Equal to open_clip's `ClipLoss` on L2-normalized features (what open_clip's models output), in value and
    in every gradient, logit_scale's included; memory O(N * D) instead of the N x N logits.

    Args:
        gather_distributed: score this rank's pairs against the features of every rank (open_clip's
            `local_loss=True, gather_with_grad=True`); see `clip_loss`. No effect outside a process group.
        allow_tf32: CUDA only, see `contrastive_loss`.
    """

    def __init__(self, gather_distributed=False, allow_tf32=None):
        super().__init__()
        self.gather_distributed = bool(gather_distributed)
        self.allow_tf32 = allow_tf32

    def extra_repr(self):
        return f"gather_distributed={self.gather_distributed}"

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """image_features, text_features: (N, D); logit_scale: exp of the learned log scale (1 / tau).
        Returns the loss, or {"contrastive_loss": loss} with output_dict=True."""
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, self.gather_distributed,
                         self.allow_tf32)
        return {"contrastive_loss": loss} if output_dict else loss
