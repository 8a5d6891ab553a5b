"""Evaluation of a frozen encoder: linear probe, weighted kNN and the few-label probe.

All three read features of the held-out split and of the labelled training split, computed once in
eval mode. The linear probe is multinomial logistic regression (cross-entropy, L2) on standardized
features, fit full-batch with L-BFGS; the kNN classifier is the weighted cosine vote of Wu et al. 2018
(InstDisc), also SimCLR's monitor: weight exp(sim / T) of each of the k nearest training samples.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, eval_transform

__all__ = ["extract_features", "linear_probe", "knn_classify", "fewshot_probe", "evaluate_features", "evaluate_encoder"]


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, size: int, mean: Sequence[float], std: Sequence[float],
                     batch_size: int = 512, device="cpu", num_workers: int = 0) -> torch.Tensor:
    """Encoder outputs h (N, F) in float32 on the CPU, the encoder in eval mode (restored afterwards)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for x, _ in images.batches(torch.arange(len(images)), batch_size, num_workers):
            x = eval_transform(x.to(device), size, mean, std)
            out.append(encoder(x).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def _standardize(train: torch.Tensor, *others: torch.Tensor, stats_from: Optional[torch.Tensor] = None):
    ref = train if stats_from is None else stats_from
    mu, sd = ref.mean(0), ref.std(0, unbiased=False).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train,) + others]


def _topk_acc(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    return hit.double().mean().item()


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    """Cross-entropy + (weight_decay / 2) |W|^2, full batch, L-BFGS with strong-Wolfe line search
    (deterministic; converges on the small probes without a learning-rate sweep)."""
    clf = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    x, y = x.double(), y.long()
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: Optional[int] = None, weight_decay: float = 1e-4, max_iter: int = 500,
                 stats_from: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Linear classifier on standardized features (statistics of `stats_from`, default train_x).
    train_x: (N, F), test_x: (M, F). Returns {"top1", "top5"} fractions on the test set."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F) with one F, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels must have the same length")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    tr, te = _standardize(train_x.double(), test_x.double(), stats_from=None if stats_from is None else stats_from.double())
    clf = _fit_logistic(tr, train_y, num_classes, weight_decay, max_iter)
    with torch.no_grad():
        logits = clf(te)
    return {"top1": _topk_acc(logits, test_y, 1), "top5": _topk_acc(logits, test_y, 5)}


@torch.no_grad()
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
                 chunk: int = 1024) -> float:
    """Weighted kNN top-1: cosine similarity to every training feature, the k nearest vote with weight
    exp(sim / temperature) (Wu et al. 2018). k is capped at the training-set size."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    tr, te = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, len(tr))
    correct = 0
    for start in range(0, len(te), chunk):
        sim, idx = (te[start:start + chunk] @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[start:start + chunk]).sum())
    return correct / max(1, len(te))


def fewshot_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  shots: int = 5, draws: int = 5, seed: int = 0, weight_decay: float = 1e-2) -> float:
    """Semi-supervised setting: a linear probe fit on `shots` labelled images per class, mean top-1
    over `draws` random draws (seeded). Features are standardized with the statistics of the whole
    (unlabelled) training split."""
    if shots < 1 or draws < 1:
        raise ValueError(f"need shots >= 1 and draws >= 1, got shots={shots}, draws={draws}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(train_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    accs = []
    for _ in range(draws):
        picks = []
        for c in classes.tolist():
            members = (train_y == c).nonzero().flatten()
            picks.append(members[torch.randperm(len(members), generator=g)[:shots]])
        idx = torch.cat(picks)
        accs.append(linear_probe(train_x[idx], train_y[idx], test_x, test_y, num_classes, weight_decay,
                                 stats_from=train_x)["top1"])
    return sum(accs) / len(accs)


def evaluate_features(train_x, train_y, test_x, test_y, knn_k: int = 200, knn_temperature: float = 0.1,
                      shots: int = 5, draws: int = 5, seed: int = 0) -> Dict[str, float]:
    lin = linear_probe(train_x, train_y, test_x, test_y)
    return {"linear_top1": lin["top1"], "linear_top5": lin["top5"],
            "knn_top1": knn_classify(train_x, train_y, test_x, test_y, knn_k, knn_temperature),
            "fewshot_top1": fewshot_probe(train_x, train_y, test_x, test_y, shots, draws, seed)}


def evaluate_encoder(encoder: nn.Module, train: ImageSet, test: ImageSet, size: int, mean, std, device="cpu",
                     batch_size: int = 512, **kwargs) -> Dict[str, float]:
    """Linear probe (top-1/top-5), weighted kNN and few-label probe of a frozen encoder, as fractions."""
    tr = extract_features(encoder, train, size, mean, std, batch_size, device)
    te = extract_features(encoder, test, size, mean, std, batch_size, device)
    return evaluate_features(tr, train.labels, te, test.labels, **kwargs)
