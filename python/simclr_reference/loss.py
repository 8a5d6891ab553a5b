"""Contrastive losses computed the textbook way, materializing the (M, L) similarity matrix."""
import torch
import torch.nn.functional as F


def _reduce(per_row, has_positive, reduction):
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / has_positive.sum().clamp_min(1).to(per_row.dtype)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def contrastive_loss(q, k, q_labels, k_labels, temperature=0.1, self_offset=None, reduction="mean",
                     exclude_positives=False, positive_weight=None, normalize=True):
    """Multi-positive contrastive loss over cosine similarities.

    q: (M, D) queries, k: (L, D) keys, q_labels: (M,), k_labels: (L,) integer labels. Key j is a
    positive of query i when their labels match and j is not i's own key; with `self_offset` set,
    query i's own key is i + self_offset and is also left out of the denominator.
    loss_i = logsumexp_{j in N(i)} s_ij - w_i mean_{j in P(i)} s_ij with s = cos / temperature, N(i) every key
    but the own one (and but the positives with `exclude_positives`, DCL), w = `positive_weight` (M,) or 1;
    rows without positives have loss 0 and are left out of the mean. `temperature` may be a tensor.
    normalize=False: s = <q_i, k_j> / temperature on the rows as given (dot products).
    """
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    s = q @ k.T / temperature
    m, l = s.shape
    rows = torch.arange(m, device=q.device)
    not_self = torch.ones(m, l, dtype=torch.bool, device=q.device)
    if self_offset is not None:
        not_self[rows, rows + self_offset] = False
    positive = (q_labels[:, None] == k_labels[None, :]) & not_self
    denominator = not_self & ~positive if exclude_positives else not_self
    lse = torch.logsumexp(s.masked_fill(~denominator, float("-inf")), dim=1)
    num_pos = positive.sum(1)
    pos_mean = (s * positive).sum(1) / num_pos.clamp_min(1)
    if positive_weight is not None:
        pos_mean = positive_weight * pos_mean
    per_row = torch.where(num_pos > 0, lse - pos_mean, torch.zeros_like(lse))
    return _reduce(per_row, num_pos > 0, reduction)


def nt_xent(z1, z2, temperature=0.5, reduction="mean"):
    """NT-Xent of SimCLR (Chen et al. 2020, eq. 1): z1, z2 (N, D) are two views of N samples.

    Mean over all 2N anchors of -log softmax of the positive pair among the 2N - 1 other samples,
    the same value as lightly's NTXentLoss.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    labels = torch.arange(n, device=z1.device).repeat(2)
    return contrastive_loss(z, z, labels, labels, temperature, self_offset=0, reduction=reduction)


def nt_xent_plain(z1, z2, temperature=0.5):
    """NT-Xent written the way PyTorch users usually write it: F.cross_entropy over the masked (2N, 2N)
    logits, mean over the 2N anchors. The baseline of simclr_ext's speed and memory numbers (what a user
    would otherwise run); `nt_xent` above, the general masked formulation, is the parity oracle.

    The self-similarities are masked in place (fill_diagonal_), the cheapest usual form.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(n, device=z.device)])
    return F.cross_entropy(logits, targets)


def siglip_loss(image, text, logit_scale, logit_bias=None, image_labels=None, text_labels=None):
    """SigLIP's sigmoid loss (Zhai et al. 2023): -sum_ij log sigmoid(y_ij (scale <image_i, text_j> + bias)) / N,
    y_ij = +1 for a positive pair, -1 otherwise; the positives are the diagonal (pair i), or the pairs with equal
    labels when labels are given (image_labels for the rows, text_labels for the columns)."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    if image_labels is None:
        positive = torch.eye(image.shape[0], text.shape[0], dtype=torch.bool, device=image.device)
    else:
        positive = image_labels[:, None] == text_labels[None, :]
    y = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(y * logits).sum() / image.shape[0]
