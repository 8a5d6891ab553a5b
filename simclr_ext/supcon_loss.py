"""Supervised contrastive loss on the fused op.

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020, eq. (2) (L_out, contrast_mode "all"):
every view is an anchor; its positives are the other views of its sample and the views of the samples
that share its label; the denominator holds every view but the anchor itself.
"""
import torch
from torch import nn

from . import distributed
from .loss import _check_labels, _check_temperature, contrastive_loss

__all__ = ["supcon_loss", "SupConLoss"]


def _flatten_views(features):
    """(B, V, D) -> (V * B, D) view-major (view v of sample b at row v * B + b, SupCon's order), or (N, D) as is.
    Returns the rows and V (1 for 2-D features)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 3:
        b, v, d = features.shape
        return features.transpose(0, 1).reshape(v * b, d), v
    if features.dim() == 2:
        return features, 1
    raise ValueError(f"features must be (B, V, D) views or (N, D) rows, got shape {list(features.shape)}")


def _row_labels(features, labels, views):
    b = features.shape[0]
    if labels is None:
        if views == 1:
            raise ValueError("labels=None needs (B, V, D) features with V >= 2 views (a sample's other views are its "
                             "positives); (N, D) features need labels")
        return torch.arange(b, device=features.device).repeat(views)
    return _check_labels("labels", labels, b, features.device).repeat(views)


def _check_base_temperature(base_temperature):
    return None if base_temperature is None else _check_temperature(base_temperature, "base_temperature")


def supcon_loss(features, labels=None, temperature=0.1, base_temperature=None, gather_distributed=False,
                allow_tf32=None):
    """Supervised contrastive loss (Khosla et al. 2020, L_out), fused.

    Args:
        features: (B, V, D) V views of B samples, or (N, D) rows (then `labels` is required). L2-normalized
            inside (SupCon's networks normalize their projections before the loss).
        labels: (B,) or (N,) integer classes; None: each sample is its own class (multi-view SimCLR).
        temperature: tau (> 0), a float or a 0-d tensor that may require grad; 0.1 as in
            pytorch-metric-learning (the paper's code uses 0.07).
        base_temperature: None (no factor, pytorch-metric-learning), or the paper code's base temperature:
            the loss is then multiplied by temperature / base_temperature.
        gather_distributed: under torch.distributed, this rank's rows are scored against the rows of every
            rank; each rank returns the mean over its own rows that have a positive.
        allow_tf32: CUDA only, see `contrastive_loss`.

    Returns the mean over the anchors that have a positive (an anchor alone in its class with V = 1 is left
    out, as pytorch-metric-learning's AvgNonZeroReducer does); 0 when none has, and 0 when the (global) batch
    has no negative pair (a single label), as pytorch-metric-learning's SupConLoss: still differentiable, with
    zero gradients.
    """
    rows, views = _flatten_views(features)
    row_labels = _row_labels(features, labels, views)
    temperature = _check_temperature(temperature)
    base_temperature = _check_base_temperature(base_temperature)
    keys, key_labels, offset = rows, row_labels, 0
    if gather_distributed and distributed.is_distributed():
        rank, _ = distributed.world_info()
        keys = distributed.all_gather_with_grad(rows)
        if labels is None:
            # Global sample ids: sample b of rank r is r * B + b (no communication needed).
            b = features.shape[0]
            world = keys.shape[0] // rows.shape[0]
            row_labels = row_labels + rank * b
            key_labels = (torch.arange(b, device=rows.device).repeat(views)
                          + b * torch.arange(world, device=rows.device).unsqueeze(1)).reshape(-1)
        else:
            key_labels = distributed.all_gather_no_grad(row_labels)
        offset = rank * rows.shape[0]
    loss = contrastive_loss(rows, keys, row_labels, key_labels, temperature, self_offset=offset,
                            allow_tf32=allow_tf32)
    # No negative anywhere (every key shares the one label): pytorch-metric-learning's value is 0. A mask, not a
    # branch, so that no device synchronization is needed and the gradient is an exact 0.
    has_negative = (key_labels != key_labels[:1]).any()
    loss = loss * has_negative.to(loss.dtype)
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


class SupConLoss(nn.Module):
    """Supervised contrastive loss as a module: `SupConLoss(temperature=0.1)(features, labels)`.

    features (B, V, D) views or (N, D) rows; labels (B,) / (N,) or None (multi-view SimCLR: a sample's
    other views are its positives). Equals pytorch-metric-learning's `SupConLoss(temperature)` on the
    flattened views, and the paper's formulation (contrast_mode "all") with `base_temperature`.

    Args:
        temperature: tau (> 0), default 0.1; a float or a 0-d tensor (an nn.Parameter is trained).
        base_temperature: None, or the factor temperature / base_temperature of the paper's code.
        gather_distributed: negatives and positives from every rank, see `supcon_loss`.
        allow_tf32: CUDA only, see `contrastive_loss`.
    """

    def __init__(self, temperature=0.1, base_temperature=None, gather_distributed=False, allow_tf32=None):
        super().__init__()
        checked = _check_temperature(temperature)
        # A tensor is kept as given, so that an nn.Parameter registers with this module and is trained.
        self.temperature = temperature if isinstance(temperature, torch.Tensor) else checked
        self.base_temperature = _check_base_temperature(base_temperature)
        self.gather_distributed = bool(gather_distributed)
        self.allow_tf32 = allow_tf32

    def extra_repr(self):
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"gather_distributed={self.gather_distributed}")

    def forward(self, features=None, labels=None, *, embeddings=None):
        """features: (B, V, D) or (N, D), positionally or as `features=` / `embeddings=` (pytorch-metric-learning's
        name); labels: (B,) / (N,) integer classes or None. Returns the scalar loss."""
        if (features is None) == (embeddings is None):
            raise TypeError("SupConLoss.forward takes the features once: positionally, as features= or as "
                            f"embeddings=; got {'both' if features is not None else 'neither'}")
        features = embeddings if features is None else features
        return supcon_loss(features, labels, self.temperature, self.base_temperature, self.gather_distributed,
                           self.allow_tf32)
