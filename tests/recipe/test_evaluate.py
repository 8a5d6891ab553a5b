"""Linear probe, weighted kNN and the few-label probe on features with a known answer, and the
evaluation of an encoder under torch.distributed (2 gloo ranks) against a single process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclr_ext.recipe import evaluate
from simclr_ext.recipe.evaluate import evaluate_features, fewshot_probe, knn_classify, linear_probe, shard_range


def _clusters(gen, n_per_class, classes=4, dim=6, spread=0.3):
    centres = torch.randn(classes, dim, generator=gen) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=gen), y


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_knn_matches_a_brute_force_vote(gen, chunk):
    tr, te = torch.randn(50, 5, generator=gen), torch.randn(17, 5, generator=gen)
    ytr, yte = torch.randint(0, 3, (50,), generator=gen), torch.randint(0, 3, (17,), generator=gen)
    k, t = 7, 0.2
    sim = F.normalize(te.double(), dim=1) @ F.normalize(tr.double(), dim=1).T
    expected = []
    for row in sim:
        top = row.topk(k)
        votes = torch.zeros(3, dtype=torch.float64).index_add_(0, ytr[top.indices], (top.values / t).exp())
        expected.append(int(votes.argmax()))
    acc = knn_classify(tr, ytr, te, yte, k=k, temperature=t, chunk=chunk)
    assert acc == pytest.approx((torch.tensor(expected) == yte).double().mean().item())


def test_knn_caps_k_and_separates_clusters(gen):
    x, y = _clusters(gen, 20)
    assert knn_classify(x, y, x + 0.01, y, k=200) == 1.0
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(x, y, x, y, k=0)


@pytest.mark.parametrize("full_batch_max_elements", [evaluate.FULL_BATCH_MAX_ELEMENTS, 0])  # L-BFGS, mini-batch
def test_linear_probe_learns_a_linear_rule(gen, full_batch_max_elements):
    x = torch.randn(1500, 8, generator=gen) * torch.tensor([1, 10, 0.1, 1, 1, 1, 1, 1.0])  # uneven scales
    y = (x[:, 0] + x[:, 2] * 10 > 0).long() + 2 * (x[:, 1] > 0).long()
    kw = dict(full_batch_max_elements=full_batch_max_elements)
    r = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], **kw)
    # a linear rule: 97.4-99.2% (L-BFGS) and 97.6-98.8% (SGD) over seeds 0-5
    assert r["top1"] > 0.94 and r["top5"] == 1.0
    shuffled = linear_probe(x[:1000], y[:1000][torch.randperm(1000, generator=gen)], x[1000:], y[1000:], **kw)
    assert shuffled["top1"] < 0.6  # no signal, no accuracy
    with pytest.raises(ValueError, match="features must be"):
        linear_probe(x[:10], y[:10], x[:5, :3], y[:5])


def test_minibatch_probe_agrees_with_lbfgs(gen):
    # 2000 held-out points: the two fits disagree on boundary points, and on 150 points that noise
    # alone moved top-1 by 0.04. Over seeds 0-59: |top-1 difference| <= 0.0165, objective gap <= 0.0198.
    x, y = _clusters(gen, 470, classes=5, dim=10, spread=2.5)
    perm = torch.randperm(len(x), generator=gen)
    x, y = x[perm], y[perm]
    full = linear_probe(x[:350], y[:350], x[350:], y[350:])
    mini = linear_probe(x[:350], y[:350], x[350:], y[350:], full_batch_max_elements=0)
    assert abs(full["top1"] - mini["top1"]) <= 0.04
    train = evaluate._standardize(x[:350].double())[0]

    def objective(clf):
        return float(F.cross_entropy(clf(train), y[:350]) + 0.5e-4 * clf.weight.pow(2).sum())

    with torch.no_grad():
        gap = objective(evaluate._fit_minibatch(train.float(), y[:350], 5, 1e-4)) - objective(
            evaluate._fit_lbfgs(train, y[:350], 5, 1e-4, 500))
    assert -1e-6 <= gap <= 0.05  # SGD reaches the convex optimum L-BFGS finds, up to its step noise


def test_fewshot_uses_k_per_class_and_is_seeded(gen):
    x, y = _clusters(gen, 30, spread=2.0)
    a = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=1, draws=3, seed=0)
    b = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=1, draws=3, seed=0)
    many = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=10, draws=3, seed=0)
    assert a == b and 0.25 < a <= many
    with pytest.raises(ValueError, match="shots"):
        fewshot_probe(x, y, x, y, shots=0)


def test_evaluate_features_fits_once_and_scores_each_split(gen):
    x, y = _clusters(gen, 40, spread=1.5)
    perm = torch.randperm(len(x), generator=gen)
    x, y = x[perm], y[perm]
    tr, va, te = slice(0, 100), slice(100, 130), slice(130, 160)
    out = evaluate_features(x[tr], y[tr], eval_sets={"validation": (x[va], y[va]), "test": (x[te], y[te])}, draws=2)
    assert out["linear_top1"] == linear_probe(x[tr], y[tr], x[te], y[te])["top1"]
    assert out["validation_linear_top1"] == linear_probe(x[tr], y[tr], x[va], y[va])["top1"]
    assert out["validation_knn_top1"] == knn_classify(x[tr], y[tr], x[va], y[va])
    assert out["fewshot_top1"] == fewshot_probe(x[tr], y[tr], x[te], y[te], draws=2)


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (10, 2), (1797, 4)])
def test_shards_partition_the_rows(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


# ----- two gloo ranks against one process ----------------------------------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoder():
    from simclr_ext.recipe.models import build_encoder

    torch.manual_seed(3)
    return build_encoder("small_cnn", 1, width=4, pool=1, final_relu=False)


def _evaluate(full_batch_max_elements):
    from simclr_ext.recipe.data import load_dataset

    s = load_dataset("digits")
    return evaluate.evaluate_encoder(_encoder(), s.train, s.test, s.image_size, s.mean, s.std, validation=s.validation,
                                     num_classes=10, draws=2, full_batch_max_elements=full_batch_max_elements,
                                     batch_size=100)


def _eval_worker(rank, port, out_dir, full_batch_max_elements):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        extracted = []
        real = evaluate.extract_features

        def recording(encoder, images, *args, **kw):
            extracted.append((len(images), kw["rows"]))
            return real(encoder, images, *args, **kw)

        evaluate.extract_features = recording
        result = _evaluate(full_batch_max_elements)
        torch.save({"result": result, "extracted": extracted}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("full_batch_max_elements", [evaluate.FULL_BATCH_MAX_ELEMENTS, 0])  # L-BFGS, mini-batch
def test_two_rank_evaluation_equals_one_process(tmp_path, full_batch_max_elements):
    mp.spawn(_eval_worker, args=(_free_port(), str(tmp_path), full_batch_max_elements), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(full_batch_max_elements)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["result"] == ranks[1]["result"]  # every rank gets the global numbers
    for key, value in single.items():
        # accuracies are counts over the split: equal, up to one image (feature rounding at a tie)
        assert ranks[0]["result"][key] == pytest.approx(value, abs=1.01 / 250), key
    # each split was extracted once, in two disjoint shards that cover it
    for (n0, rows0), (n1, rows1) in zip(ranks[0]["extracted"], ranks[1]["extracted"]):
        assert n0 == n1 and rows0[0] == 0 and rows0[1] == rows1[0] and rows1[1] == n0
    assert len(ranks[0]["extracted"]) == 3  # train, validation, test
