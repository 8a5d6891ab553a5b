"""Decoupled contrastive learning (DCL, DCLW) on the fused op.

Yeh et al., "Decoupled Contrastive Learning", ECCV 2022, eq. (6): NT-Xent with the positive pair left
out of the denominator, optionally with a weight w_i on the positive term (DCLW: the negative von
Mises-Fisher weight 2 - N softmax_i(cos(z1_i, z2_i) / sigma)). The signatures are lightly's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .loss import _check_embeddings, _check_temperature, _paired_loss

__all__ = ["dcl_loss", "dclw_loss", "negative_mises_fisher_weights", "DCLLoss", "DCLWLoss"]


@torch.no_grad()
def negative_mises_fisher_weights(out0, out1, sigma=0.5):
    """DCLW's weights (Yeh et al. 2022, sec. 4): 2 - N softmax_i(cos(out0_i, out1_i) / sigma), (N,).

    out0, out1: (N, D). Constants: no gradient flows through them (as in the paper's code and lightly).
    Computed in float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if out0.dtype == torch.float64 else torch.float32
    cos = (F.normalize(out0.to(acc), dim=1) * F.normalize(out1.to(acc), dim=1)).sum(1)
    return 2 - out0.shape[0] * torch.softmax(cos / sigma, dim=0)


def _check_pair(out0, out1):
    _check_embeddings("out0", out0)
    _check_embeddings("out1", out1)
    if out0.shape != out1.shape or out0.dtype != out1.dtype or out0.device != out1.device:
        raise ValueError(f"out0 and out1 must have the same shape (N, D), dtype and device, got {list(out0.shape)} "
                         f"{out0.dtype} on {out0.device} and {list(out1.shape)} {out1.dtype} on {out1.device}")


def _check_sigma(sigma):
    return _check_temperature(sigma, "sigma")


def _weights_of(weight_fn, out0, out1):
    """weight_fn on the normalized views, both directions -> (2N,) (rows of cat(out0, out1))."""
    n = out0.shape[0]
    n0, n1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    weights = []
    for a, b in ((n0, n1), (n1, n0)):
        w = weight_fn(a, b)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weight_fn must return a floating tensor of shape [{n}], got "
                            f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
        if w.shape not in ((n,), ()):
            raise ValueError(f"weight_fn must return one weight per sample, shape [{n}], got {list(w.shape)}")
        weights.append(w.to(out0.device).expand(n))
    return torch.cat(weights), (n0 * n1).sum(1)


def _dcl(out0, out1, temperature, weights, cos_pos, gather_distributed, allow_tf32):
    _check_pair(out0, out1)
    temperature = _check_temperature(temperature)
    if gather_distributed and distributed.is_distributed():
        q, keys, q_labels, k_labels, offset = distributed.gather_pairs(out0, out1)
    else:
        q = keys = torch.cat([out0, out1], dim=0)
        q_labels = k_labels = torch.arange(out0.shape[0], device=q.device).repeat(2)
        offset = 0
    if keys.shape[0] < 4:
        raise ValueError(f"DCL needs at least 2 samples in the (global) batch: with one sample the positive pair "
                         f"leaves no negative, got out0 of shape {list(out0.shape)}")
    constant = None if weights is None else weights.detach()
    loss = _paired_loss(q, keys, q_labels, k_labels, temperature, offset, "mean", allow_tf32,
                       exclude_positives=True, positive_weight=constant)
    if weights is not None and weights.requires_grad:
        # A differentiable weight_fn: d loss / d w_i = -s_pos_i / 2N. This term adds exactly that gradient
        # (its value is 0), so the fused op keeps its weights constant. O(N) on top of the op.
        s_pos = (cos_pos.detach() / temperature.detach() if isinstance(temperature, torch.Tensor)
                 else cos_pos.detach() / temperature).repeat(2)
        loss = loss - ((weights - constant) * s_pos.to(weights.dtype)).mean().to(loss.dtype)
    return loss


def dcl_loss(out0, out1, temperature=0.1, weight_fn=None, gather_distributed=False, allow_tf32=None):
    """Decoupled contrastive loss (Yeh et al. 2022, eq. 6), fused: the mean over the 2N anchors of
    logsumexp over the negatives (every other view but the positive) minus w_i s_pos.

    Args:
        out0, out1: (N, D) projections of two views of N samples (L2-normalized inside, as lightly does).
        temperature: tau (> 0), default 0.1 (lightly's); a float or a 0-d tensor that may require grad.
        weight_fn: None, or w(out0, out1) -> (N,) weights of the positive term, called like lightly on the
            normalized views, once per direction; its gradient (if any) flows as in lightly.
        gather_distributed: negatives from every rank; each rank returns the mean over its own 2N anchors.
        allow_tf32: CUDA only, see `contrastive_loss`.
    """
    _check_pair(out0, out1)
    weights, cos_pos = _weights_of(weight_fn, out0, out1) if weight_fn is not None else (None, None)
    return _dcl(out0, out1, temperature, weights, cos_pos, gather_distributed, allow_tf32)


def dclw_loss(out0, out1, temperature=0.1, sigma=0.5, gather_distributed=False, allow_tf32=None):
    """Weighted decoupled contrastive loss (DCLW, Yeh et al. 2022): `dcl_loss` with the constant weights
    `negative_mises_fisher_weights(out0, out1, sigma)` (computed from this rank's N pairs, as lightly does)."""
    _check_pair(out0, out1)
    sigma = _check_sigma(sigma)
    weights = negative_mises_fisher_weights(out0, out1, sigma).repeat(2)
    return _dcl(out0, out1, temperature, weights, None, gather_distributed, allow_tf32)


class DCLLoss(nn.Module):
    """Decoupled contrastive loss as a module, lightly's signature: `DCLLoss(temperature=0.1)(out0, out1)`.

    Equals lightly's `DCLLoss(temperature, weight_fn, gather_distributed)` in value and gradients.

    Args:
        temperature: tau (> 0), default 0.1; a float or a 0-d tensor (an nn.Parameter is trained).
        weight_fn: None or w(out0, out1) -> (N,), the weight of the positive term (see `dcl_loss`).
        gather_distributed: negatives from every rank; no effect outside a process group.
        allow_tf32: CUDA only, see `contrastive_loss`.
    """

    def __init__(self, temperature=0.1, weight_fn=None, gather_distributed=False, allow_tf32=None):
        super().__init__()
        checked = _check_temperature(temperature)
        self.temperature = temperature if isinstance(temperature, torch.Tensor) else checked
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be None or callable, got {type(weight_fn).__name__}")
        self.weight_fn = weight_fn
        distributed.check_gather_available(gather_distributed)
        self.gather_distributed = bool(gather_distributed)
        self.allow_tf32 = allow_tf32

    def extra_repr(self):
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    def forward(self, out0, out1):
        """out0, out1: (N, D) projections of the two views. Returns the scalar loss."""
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, self.gather_distributed, self.allow_tf32)


class DCLWLoss(DCLLoss):
    """Weighted decoupled contrastive loss, lightly's signature: `DCLWLoss(temperature=0.1, sigma=0.5)`.

    The positive term of anchor i is weighted by 2 - N softmax(cos(out0, out1) / sigma)_i, a constant in
    the gradient (`negative_mises_fisher_weights`). Equals lightly's `DCLWLoss` in value and gradients.
    """

    def __init__(self, temperature=0.1, sigma=0.5, gather_distributed=False, allow_tf32=None):
        super().__init__(temperature, None, gather_distributed, allow_tf32)
        self.sigma = _check_sigma(sigma)

    def extra_repr(self):
        return f"{super().extra_repr()}, sigma={self.sigma}"

    def forward(self, out0, out1):
        return dclw_loss(out0, out1, self.temperature, self.sigma, self.gather_distributed, self.allow_tf32)
