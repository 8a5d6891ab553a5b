"""Evaluation of a frozen encoder: linear probe, weighted kNN and the few-label probe.

All three read features (the encoder output h, in eval mode) of the labelled training split and of the
evaluation splits (validation, test). The linear probe is multinomial logistic regression (cross-entropy,
L2) on standardized features: full-batch L-BFGS while the features fit comfortably, mini-batch SGD beyond
that. The kNN classifier is the weighted cosine vote of Wu et al. 2018 (InstDisc), also SimCLR's
monitor: weight exp(sim / T) of each of the k nearest training samples, computed in chunks on the
features' device.

Under torch.distributed every rank extracts its own shard of every split; the training features are
gathered on every rank (the kNN bank), each rank scores its shard of the evaluation splits and the counts
are summed. The full-batch probe runs on every rank at once (same features, same result), the mini-batch
probe splits each batch across ranks: no rank waits in a collective while another works alone.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, eval_transform

__all__ = ["extract_features", "linear_probe", "knn_classify", "fewshot_probe", "evaluate_features", "evaluate_encoder",
           "shard_range", "FULL_BATCH_MAX_ELEMENTS"]

# The full-batch float64 L-BFGS probe holds a few copies of the (N, F) features: up to 2^25 elements
# (~270 MB each in float64: digits, CIFAR with ResNet-18) it is used; beyond, the mini-batch probe. Ours.
FULL_BATCH_MAX_ELEMENTS = 1 << 25


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n rows: the first n % world ranks get one row more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, size: int, mean: Sequence[float], std: Sequence[float],
                     batch_size: int = 512, device="cpu", num_workers: int = 0, rows: Optional[Tuple[int, int]] = None,
                     out_device="cpu") -> torch.Tensor:
    """Encoder outputs h (N, F) in float32 on `out_device`, the encoder in eval mode (restored afterwards).
    `rows` = (start, stop) extracts only those images (a rank's shard)."""
    was_training = encoder.training
    encoder.eval()
    start, stop = rows if rows is not None else (0, len(images))
    out = []
    try:
        for x, _ in images.batches(torch.arange(start, stop), batch_size, num_workers):
            x = eval_transform(x.to(device), size, mean, std)
            out.append(encoder(x).float().to(out_device))
    finally:
        encoder.train(was_training)
    if out:
        return torch.cat(out)
    return torch.empty(0, _feature_dim(encoder, images, size, mean, std, device), device=out_device)


def _feature_dim(encoder, images, size, mean, std, device) -> int:
    """The width of h for a rank whose shard is empty (it still has to match the others' in a gather)."""
    x = images.subset(torch.zeros(1, dtype=torch.long))
    first = next(iter(x.batches(torch.arange(1), 1)))[0]
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder(eval_transform(first.to(device), size, mean, std)).shape[1]
    finally:
        encoder.train(was_training)


def _gather_rows(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The (n, F) concatenation of every rank's contiguous shard (sizes from shard_range), on every rank."""
    if world == 1:
        return local
    longest = shard_range(n, 0, world)[1]
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: shard_range(n, r, world)[1] - shard_range(n, r, world)[0]] for r, p in enumerate(parts)])


def _sum_over_ranks(values, device) -> list:
    """Element-wise sum of a list of numbers across ranks (float64; the identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _standardize(train: torch.Tensor, *others: torch.Tensor, stats_from: Optional[torch.Tensor] = None):
    ref = train if stats_from is None else stats_from
    mu, sd = ref.mean(0), ref.std(0, unbiased=False).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train,) + others]


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels.to(logits.device)[:, None]).any(1).sum())


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    """Cross-entropy + (weight_decay / 2) |W|^2, full batch, L-BFGS with strong-Wolfe line search
    (deterministic; converges on the small probes without a learning-rate sweep)."""
    clf = nn.Linear(x.shape[1], num_classes).double().to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    x, y = x.double(), y.long().to(x.device)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return clf


def _fit_minibatch(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, epochs: int = 30,
                   batch_size: int = 4096, lr: float = 0.1, seed: int = 0, min_steps: int = 1000) -> nn.Linear:
    """The same objective by mini-batch SGD (momentum 0.9, cosine decay, `epochs` but at least
    `min_steps` steps; our settings) in float32, for features too large for full-batch L-BFGS. `x` holds
    every training row on every rank; each global batch (one seeded permutation, the same on every
    rank) is split across ranks and the gradients are summed, so the result does not depend on the
    number of ranks beyond rounding."""
    rank, world = _world()
    clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(x) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    y = y.long().to(x.device)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(x.device)
        for start in range(0, len(x), batch_size):
            batch = perm[start:start + batch_size]
            lo, hi = shard_range(len(batch), rank, world)
            mine = batch[lo:hi]
            with torch.enable_grad():
                opt.zero_grad()
                loss = F.cross_entropy(clf(x[mine]), y[mine], reduction="sum") / len(batch)
                loss = loss + 0.5 * weight_decay * clf.weight.pow(2).sum() / world
                loss.backward()
            if world > 1:
                for p in clf.parameters():
                    dist.all_reduce(p.grad)
            opt.step()
            sched.step()
    return clf.double()


def _fit_probe(x, y, num_classes, weight_decay, max_iter, full_batch_max_elements, seed=0) -> nn.Linear:
    if x.numel() <= full_batch_max_elements:
        return _fit_lbfgs(x, y, num_classes, weight_decay, max_iter)
    return _fit_minibatch(x.float(), y, num_classes, weight_decay, seed=seed)


def _check_features(train_x, train_y, test_x, test_y):
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F) with one F, got {tuple(train_x.shape)} "
                         f"and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels must have the same length")


def _num_classes(train_y, *others) -> int:
    return int(max([int(train_y.max())] + [int(o.max()) for o in others if len(o)])) + 1


def _probe_scores(train_x, train_y, eval_sets, num_classes, weight_decay, max_iter, full_batch_max_elements,
                  stats_from=None, seed=0):
    """Fit once on the training features, score every (x, y) of `eval_sets` (this rank's shard each):
    {name: (top-1 hits, top-5 hits, rows)} summed over ranks."""
    stats = None if stats_from is None else stats_from.double()
    parts = _standardize(train_x.double(), *[x.double() for x, _ in eval_sets.values()], stats_from=stats)
    clf = _fit_probe(parts[0], train_y, num_classes, weight_decay, max_iter, full_batch_max_elements, seed)
    counts = []
    with torch.no_grad():
        for (_, y), x in zip(eval_sets.values(), parts[1:]):
            logits = clf(x)
            counts += [_topk_hits(logits, y, 1), _topk_hits(logits, y, 5), float(len(y))]
    device = train_x.device
    summed = _sum_over_ranks(counts, device)
    return {name: tuple(summed[3 * i:3 * i + 3]) for i, name in enumerate(eval_sets)}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: Optional[int] = None, weight_decay: float = 1e-4, max_iter: int = 500,
                 stats_from: Optional[torch.Tensor] = None,
                 full_batch_max_elements: int = FULL_BATCH_MAX_ELEMENTS) -> Dict[str, float]:
    """Linear classifier on standardized features (statistics of `stats_from`, default train_x).
    train_x: (N, F), test_x: (M, F). Returns {"top1", "top5"} fractions on the test set. Full-batch
    L-BFGS up to `full_batch_max_elements` training feature values, mini-batch SGD beyond. Under
    torch.distributed: train_x on every rank, test_x this rank's shard; the fractions are global."""
    _check_features(train_x, train_y, test_x, test_y)
    num_classes = num_classes or _num_classes(train_y, test_y)
    top1, top5, n = _probe_scores(train_x, train_y, {"test": (test_x, test_y)}, num_classes, weight_decay, max_iter,
                                  full_batch_max_elements, stats_from)["test"]
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}


@torch.no_grad()
def _knn_hits(train_x, train_y, test_x, test_y, k, temperature, num_classes, chunk) -> float:
    tr, te = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1).to(train_x.device)
    train_y, test_y = train_y.to(tr.device), test_y.to(tr.device)
    k = min(k, len(tr))
    correct = 0.0
    for start in range(0, len(te), chunk):
        sim, idx = (te[start:start + chunk] @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=tr.device).scatter_add_(1, train_y[idx],
                                                                                   (sim / temperature).exp())
        correct += float((votes.argmax(1) == test_y[start:start + chunk]).sum())
    return correct


@torch.no_grad()
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: Optional[int] = None,
                 chunk: int = 1024) -> float:
    """Weighted kNN top-1: cosine similarity to every training feature, the k nearest vote with weight
    exp(sim / temperature) (Wu et al. 2018). k is capped at the training-set size. Runs on train_x's
    device, `chunk` queries at a time (memory chunk x N). Under torch.distributed: train_x on every
    rank, test_x this rank's shard; the accuracy is global."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    _check_features(train_x, train_y, test_x, test_y)
    num_classes = num_classes or _num_classes(train_y, test_y)
    hits = _knn_hits(train_x, train_y, test_x, test_y, k, temperature, num_classes, chunk)
    hits, n = _sum_over_ranks([hits, float(len(test_x))], train_x.device)
    return hits / max(n, 1)


def _fewshot_index(train_y: torch.Tensor, shots: int, g: torch.Generator) -> torch.Tensor:
    picks = []
    for c in torch.unique(train_y).tolist():
        members = (train_y == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:shots]])
    return torch.cat(picks)


def _fewshot_scores(train_x, train_y, eval_sets, shots, draws, seed, weight_decay, num_classes):
    """{name: mean top-1 over draws} of the probe fit on `shots` labelled images per class."""
    if shots < 1 or draws < 1:
        raise ValueError(f"need shots >= 1 and draws >= 1, got shots={shots}, draws={draws}")
    g = torch.Generator().manual_seed(seed)
    train_y_cpu = train_y.cpu()
    totals = {name: 0.0 for name in eval_sets}
    for _ in range(draws):
        idx = _fewshot_index(train_y_cpu, shots, g).to(train_x.device)
        scores = _probe_scores(train_x[idx], train_y_cpu[idx.cpu()], eval_sets, num_classes, weight_decay, 500,
                               FULL_BATCH_MAX_ELEMENTS, stats_from=train_x)
        for name, (top1, _, n) in scores.items():
            totals[name] += top1 / max(n, 1) / draws
    return totals


def fewshot_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  shots: int = 5, draws: int = 5, seed: int = 0, weight_decay: float = 1e-2) -> float:
    """Semi-supervised setting: a linear probe fit on `shots` labelled images per class, mean top-1
    over `draws` random draws (seeded). Features are standardized with the statistics of the whole
    (unlabelled) training split."""
    _check_features(train_x, train_y, test_x, test_y)
    return _fewshot_scores(train_x, train_y, {"test": (test_x, test_y)}, shots, draws, seed, weight_decay,
                           _num_classes(train_y, test_y))["test"]


def evaluate_features(train_x, train_y, test_x=None, test_y=None, knn_k: int = 200, knn_temperature: float = 0.1,
                      shots: int = 5, draws: int = 5, seed: int = 0, eval_sets: Optional[Dict] = None,
                      num_classes: Optional[int] = None,
                      full_batch_max_elements: int = FULL_BATCH_MAX_ELEMENTS) -> Dict[str, float]:
    """linear_top1/top5, knn_top1 and fewshot_top1 of every evaluation split. `eval_sets` maps a name to
    (x, y); the "test" split's keys are bare ("linear_top1"), the others' are prefixed ("validation_
    linear_top1"). (test_x, test_y) is the short form of eval_sets={"test": (test_x, test_y)}. The
    probes are fit once and score every split."""
    eval_sets = dict(eval_sets or {})
    if test_x is not None:
        eval_sets["test"] = (test_x, test_y)
    if not eval_sets:
        raise ValueError("evaluate_features needs test_x/test_y or eval_sets")
    for x, y in eval_sets.values():
        _check_features(train_x, train_y, x, y)
    num_classes = num_classes or _num_classes(train_y, *[y for _, y in eval_sets.values()])
    linear = _probe_scores(train_x, train_y, eval_sets, num_classes, 1e-4, 500, full_batch_max_elements)
    fewshot = _fewshot_scores(train_x, train_y, eval_sets, shots, draws, seed, 1e-2, num_classes)
    out = {}
    for name, (x, y) in eval_sets.items():
        prefix = "" if name == "test" else f"{name}_"
        top1, top5, n = linear[name]
        out[prefix + "linear_top1"] = top1 / max(n, 1)
        out[prefix + "linear_top5"] = top5 / max(n, 1)
        out[prefix + "knn_top1"] = knn_classify(train_x, train_y, x, y, knn_k, knn_temperature, num_classes)
        out[prefix + "fewshot_top1"] = fewshot[name]
    return out


def sharded_features(encoder: nn.Module, images: ImageSet, size: int, mean, std, device="cpu", batch_size: int = 512,
                     num_workers: int = 0, gather: bool = False) -> torch.Tensor:
    """This rank's contiguous shard of the split's features (on `device`), or all of them on every rank
    when `gather` (the shards are extracted in parallel, then all-gathered)."""
    rank, world = _world()
    rows = shard_range(len(images), rank, world)
    local = extract_features(encoder, images, size, mean, std, batch_size=batch_size, device=device,
                             num_workers=num_workers, rows=rows, out_device=device)
    return _gather_rows(local, len(images), world) if gather else local


def evaluate_encoder(encoder: nn.Module, train: ImageSet, test: ImageSet, size: int, mean, std, device="cpu",
                     batch_size: int = 512, num_workers: int = 0, validation: Optional[ImageSet] = None,
                     num_classes: Optional[int] = None, **kwargs) -> Dict[str, float]:
    """Linear probe (top-1/top-5), weighted kNN and few-label probe of a frozen encoder, as fractions of
    `test` (bare keys) and of `validation` when given ("validation_" keys). Under torch.distributed every
    rank takes part (sharded extraction and scoring) and gets the same result."""
    feats = lambda s, gather: sharded_features(encoder, s, size, mean, std, device, batch_size, num_workers, gather)  # noqa: E731
    rank, world = _world()
    local_labels = lambda s: s.labels[slice(*shard_range(len(s), rank, world))]  # noqa: E731
    tr = feats(train, True)
    eval_sets = {}
    if validation is not None:
        eval_sets["validation"] = (feats(validation, False), local_labels(validation))
    eval_sets["test"] = (feats(test, False), local_labels(test))
    if num_classes is None:
        labels = [train.labels] + [s.labels for s in ([validation] if validation is not None else []) + [test]]
        num_classes = _num_classes(*labels)
    return evaluate_features(tr, train.labels, eval_sets=eval_sets, num_classes=num_classes, **kwargs)
