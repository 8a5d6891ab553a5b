"""Linear probe, weighted kNN and the few-label probe on features with a known answer."""
import pytest
import torch
import torch.nn.functional as F

from simclr_ext.evaluate import fewshot_probe, knn_classify, linear_probe


def _clusters(n_per_class, classes=4, dim=6, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(1)
    tr, te = torch.randn(50, 5, generator=g), torch.randn(17, 5, generator=g)
    ytr, yte = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (17,), generator=g)
    k, t = 7, 0.2
    sim = F.normalize(te.double(), dim=1) @ F.normalize(tr.double(), dim=1).T
    expected = []
    for row in sim:
        top = row.topk(k)
        votes = torch.zeros(3, dtype=torch.float64).index_add_(0, ytr[top.indices], (top.values / t).exp())
        expected.append(int(votes.argmax()))
    acc = knn_classify(tr, ytr, te, yte, k=k, temperature=t, chunk=5)
    assert acc == pytest.approx((torch.tensor(expected) == yte).double().mean().item())


def test_knn_caps_k_and_separates_clusters():
    x, y = _clusters(20)
    assert knn_classify(x, y, x + 0.01, y, k=200) == 1.0
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(x, y, x, y, k=0)


def test_linear_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g) * torch.tensor([1, 10, 0.1, 1, 1, 1, 1, 1.0])  # uneven scales
    y = (x[:, 0] + x[:, 2] * 10 > 0).long() + 2 * (x[:, 1] > 0).long()
    r = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert r["top1"] > 0.95 and r["top5"] == 1.0
    shuffled = linear_probe(x[:300], y[:300][torch.randperm(300, generator=g)], x[300:], y[300:])
    assert shuffled["top1"] < 0.6  # no signal, no accuracy
    with pytest.raises(ValueError, match="features must be"):
        linear_probe(x[:10], y[:10], x[:5, :3], y[:5])


def test_fewshot_uses_k_per_class_and_is_seeded():
    x, y = _clusters(30, spread=2.0)
    a = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=1, draws=3, seed=0)
    b = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=1, draws=3, seed=0)
    many = fewshot_probe(x[::2], y[::2], x[1::2], y[1::2], shots=10, draws=3, seed=0)
    assert a == b and 0.25 < a <= many
    with pytest.raises(ValueError, match="shots"):
        fewshot_probe(x, y, x, y, shots=0)
