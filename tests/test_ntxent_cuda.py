"""The CUDA kernels of the contrastive op against simclr_reference in float64 (values and gradients),
plus what only a GPU run can show: every output written, bit-identical reruns, batches the reference
cannot hold. Every test is marked `cuda` and skipped (by conftest.py) where torch sees no GPU."""
import math

import pytest
import torch

import simclr_ext
import simclr_reference as ref
from parity import PRECISION_PATHS, assert_matches_reference, max_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

DEV = "cuda"


def _op(*args):
    """The forward op's (loss, lse, npos); its fourth output (kept probabilities) is CPU-only."""
    return torch.ops.simclr_ext.ntxent(*args)[:3]


PATHS = PRECISION_PATHS


def _labels_case(kind, m, l, gen):
    """(q_labels, k_labels, self_offset) of the label layouts the op serves."""
    if kind == "simclr":  # q = k = cat(z1, z2): one positive per row, self excluded
        n = m // 2
        labels = torch.arange(n).repeat(2)
        return labels, labels.clone(), 0
    if kind == "views":  # 3 views of m/3 samples: two positives per row
        labels = torch.arange(m // 3).repeat(3)
        return labels, labels.clone(), 0
    if kind == "slice":  # queries are keys [off, off + m) (a distributed gather): several positives
        k_labels = torch.randint(0, 5, (l,), generator=gen)
        off = (l - m) // 2
        return k_labels[off:off + m].clone(), k_labels, off
    if kind == "supcon":  # many classes: some rows have no positive at all (loss 0, left out)
        labels = torch.randint(0, m // 2 + 1, (m,), generator=gen)
        return labels, labels.clone(), 0
    if kind == "bank":  # extra negatives with a label no query has, no self exclusion
        q_labels = torch.randint(0, 7, (m,), generator=gen)
        k_labels = torch.cat([q_labels, torch.full((l - m,), -1)])
        return q_labels, k_labels, -1
    raise ValueError(kind)


# (kind, M, L, D): odd sizes, never multiples of the 64-row tiles; D from 1 to 2048 (several D chunks).
CASES = [
    pytest.param("simclr", 2, 2, 1, id="small-simclr-N1-D1"),
    pytest.param("simclr", 6, 6, 3, id="small-simclr-N3-D3"),
    pytest.param("slice", 37, 200, 33, id="small-slice-M37-L200-D33"),
    pytest.param("bank", 70, 131, 130, id="small-bank-M70-L131-D130"),
    pytest.param("supcon", 129, 129, 64, id="small-supcon-M129-D64"),
    pytest.param("views", 195, 195, 17, id="views-M195-D17"),
    pytest.param("simclr", 258, 258, 300, id="simclr-N129-D300"),
    pytest.param("simclr", 130, 130, 2048, id="simclr-N65-D2048"),
    pytest.param("slice", 129, 1000, 129, id="slice-M129-L1000-D129"),
]


def _inputs(kind, m, l, d, gen):
    q_labels, k_labels, offset = _labels_case(kind, m, l, gen)
    k = torch.randn(l, d, generator=gen, dtype=torch.float64)
    if offset >= 0:
        q = k[offset:offset + m].clone()
    else:
        q = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return q, k, q_labels, k_labels, offset


def _ref_rows(q, k, q_labels, k_labels, t, offset):
    return ref.contrastive_loss(q, k, q_labels, k_labels, t, None if offset < 0 else offset, reduction="none")


def _positives(q_labels, k_labels, offset):
    pos = q_labels[:, None] == k_labels[None, :]
    if offset >= 0:
        rows = torch.arange(len(q_labels))
        pos[rows, rows + offset] = False
    return pos.sum(1).int()


def _leaf(x, dtype):
    return x.detach().to(DEV, dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype,tf32", PATHS)
@pytest.mark.parametrize("kind,m,l,d", CASES)
def test_matches_reference(kind, m, l, d, dtype, tf32, gen):
    """Per-row losses and the gradients of sum(w * loss) (w random, not 1) for q and k, against the
    reference in float64, allowed 2x the error of the reference run in the same dtype (TF32 matmuls for
    the TF32 path). q and k are separate leaves even where q is a slice of k."""
    t = 0.1 if kind != "views" else 0.5
    q64, k64, ql, kl, offset = _inputs(kind, m, l, d, gen)
    q_in, k_in = q64.to(dtype), k64.to(dtype)  # the values every run starts from
    ql, kl = ql.to(DEV), kl.to(DEV)
    w = torch.rand(m, generator=gen, dtype=torch.float64).to(DEV) + 0.5

    q, k = _leaf(q_in, dtype), _leaf(k_in, dtype)
    loss, lse, npos = _op(q, k, ql, kl, torch.tensor(t), offset, tf32)
    assert loss.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(npos.cpu(), _positives(ql.cpu(), kl.cpu(), offset))
    gq, gk = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), (q, k))

    q_r, k_r = _leaf(q_in, torch.float64), _leaf(k_in, torch.float64)
    loss_r = _ref_rows(q_r, k_r, ql, kl, t, offset)
    gq_r, gk_r = torch.autograd.grad((loss_r * w).sum(), (q_r, k_r))

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        q_s, k_s = _leaf(q_in, dtype), _leaf(k_in, dtype)
        loss_s = _ref_rows(q_s, k_s, ql, kl, t, offset)
        gq_s, gk_s = torch.autograd.grad((loss_s * w.to(dtype)).sum(), (q_s, k_s))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev

    assert torch.isfinite(lse).all(), "every row of these cases has keys in its denominator"
    assert_matches_reference(loss, loss_s, loss_r, dtype, f"{kind} loss")
    assert gq.dtype == dtype and gq.shape == q.shape and gk.dtype == dtype and gk.shape == k.shape
    assert_matches_reference(gq, gq_s, gq_r, dtype, f"{kind} grad q")
    assert_matches_reference(gk, gk_s, gk_r, dtype, f"{kind} grad k")


SYMMETRIC_CASES = [c for c in CASES if c.values[0] in ("simclr", "views", "supcon")]


def _path_counts():
    return {k: v for k, v in simclr_ext.ops.ntxent_path_counts().items() if v}


@pytest.mark.parametrize("dtype,tf32", PATHS)
@pytest.mark.parametrize("kind,m,l,d", SYMMETRIC_CASES)
def test_symmetric_path_matches_reference(kind, m, l, d, dtype, tf32, gen):
    """q is k (one leaf, one labels tensor, self_offset 0): the single symmetric backward pass
    (H = dS + dS^T) gives the leaf's whole gradient; checked against float64 with a random grad_output,
    and the path counters show that this pass, not the general two, ran."""
    t = 0.1 if kind != "views" else 0.5
    z64, _, labels, _, _ = _inputs(kind, m, l, d, gen)
    z_in = z64.to(dtype)
    labels = labels.to(DEV)
    w = torch.rand(m, generator=gen, dtype=torch.float64).to(DEV) + 0.5
    z = _leaf(z_in, dtype)
    simclr_ext.ops.reset_ntxent_path_counts()
    loss, _, _ = _op(z, z, labels, labels, torch.tensor(t), 0, tf32)
    (g,) = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), z)
    assert _path_counts() == {"cuda_forward": 1, "cuda_backward_symmetric": 1}
    z_r = _leaf(z_in, torch.float64)
    loss_r = _ref_rows(z_r, z_r, labels, labels, t, 0)
    (g_r,) = torch.autograd.grad((loss_r * w).sum(), z_r)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        z_s = _leaf(z_in, dtype)
        loss_s = _ref_rows(z_s, z_s, labels, labels, t, 0)
        (g_s,) = torch.autograd.grad((loss_s * w.to(dtype)).sum(), z_s)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_matches_reference(loss, loss_s, loss_r, dtype, f"{kind} loss")
    assert g.dtype == dtype and g.shape == z.shape
    assert_matches_reference(g, g_s, g_r, dtype, f"{kind} symmetric grad")


def test_general_path_counted_for_distinct_keys(gen):
    q = torch.randn(50, 20, generator=gen, device="cpu").to(DEV).requires_grad_(True)
    k = q.detach().clone().requires_grad_(True)
    labels = torch.arange(25, device=DEV).repeat(2)
    simclr_ext.ops.reset_ntxent_path_counts()
    loss, _, _ = _op(q, k, labels, labels, torch.tensor(0.2), 0, False)
    gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    assert _path_counts() == {"cuda_forward": 1, "cuda_backward_general": 1}
    assert torch.count_nonzero(gk) > 0


@pytest.mark.parametrize("dtype,tf32", [pytest.param(torch.float32, False, id="fp32"),
                                        pytest.param(torch.bfloat16, False, id="bf16")])
def test_symmetric_equals_general_with_splits(dtype, tf32, gen):
    """2N = 8192 (the streamed tiles are split across blocks): the symmetric pass's gradient equals the sum
    of the general dQ and dK passes on the same values, to rounding, and reruns are bit-identical."""
    n2, d = 8192, 128
    z_in = torch.randn(n2, d, generator=gen).to(DEV, dtype)
    labels = torch.arange(n2 // 2, device=DEV).repeat(2)

    def symmetric():
        z = z_in.clone().requires_grad_(True)
        loss, _, _ = _op(z, z, labels, labels, torch.tensor(0.2), 0, tf32)
        return torch.autograd.grad(loss.sum(), z)[0]

    q = z_in.clone().requires_grad_(True)
    k = z_in.clone().requires_grad_(True)
    loss, _, _ = _op(q, k, labels, labels, torch.tensor(0.2), 0, tf32)
    gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    first, second = symmetric(), symmetric()
    assert torch.equal(first, second)
    general = gq.double() + gk.double()
    scale = general.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_err(first, general) <= tol * scale


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_lse_matches_reference(dtype, tf32, gen):
    """The saved log-sum-exp is the one of the denominator (self excluded), not just any consistent value."""
    q64, k64, ql, kl, offset = _inputs("slice", 77, 150, 40, gen)
    _, lse, _ = _op(q64.to(DEV, dtype), k64.to(DEV, dtype), ql.to(DEV), kl.to(DEV), torch.tensor(0.2), offset, tf32)
    s = torch.nn.functional.normalize(q64, dim=1) @ torch.nn.functional.normalize(k64, dim=1).T / 0.2
    rows = torch.arange(77)
    s[rows, rows + offset] = -math.inf
    lse_ref = torch.logsumexp(s, dim=1)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 0.1)
    assert max_err(lse.cpu(), lse_ref) < (tol if not tf32 else 0.05)


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_public_api_on_cuda_tensors(dtype, tf32, gen):
    """nt_xent, NTXentLoss and contrastive_loss take CUDA tensors with no change in user code."""
    n, d = 100, 65
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a, b = _leaf(z1.to(dtype), dtype), _leaf(z2.to(dtype), dtype)
    loss = simclr_ext.nt_xent(a, b, 0.5, allow_tf32=tf32)
    module_loss = simclr_ext.NTXentLoss(temperature=0.5, allow_tf32=tf32)(a, b)
    assert loss.device.type == "cuda" and torch.equal(loss, module_loss)
    ga, gb = torch.autograd.grad(loss, (a, b))
    a_r, b_r = _leaf(z1, torch.float64), _leaf(z2, torch.float64)
    loss_r = ref.nt_xent(a_r, b_r, 0.5)
    ga_r, gb_r = torch.autograd.grad(loss_r, (a_r, b_r))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a_s, b_s = _leaf(z1.to(dtype), dtype), _leaf(z2.to(dtype), dtype)
        loss_s = ref.nt_xent(a_s, b_s, 0.5)
        ga_s, gb_s = torch.autograd.grad(loss_s, (a_s, b_s))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_matches_reference(loss, loss_s, loss_r, dtype, "nt_xent")
    assert_matches_reference(ga, ga_s, ga_r, dtype, "nt_xent grad z1")
    assert_matches_reference(gb, gb_s, gb_r, dtype, "nt_xent grad z2")


def test_global_tf32_switch_selects_the_path(gen):
    """set_tf32(False) runs the exact fp32 path, set_tf32(True) the TF32 one (the same bits as the op's flag),
    and by default torch's float32 matmul precision decides ("highest": exact, "high": TF32)."""
    z1 = torch.randn(300, 96, generator=gen).to(DEV)
    z2 = torch.randn(300, 96, generator=gen).to(DEV)
    z = torch.cat([z1, z2])
    labels = torch.arange(300, device=DEV).repeat(2)
    precision = torch.get_float32_matmul_precision()
    try:
        for enabled in (False, True):
            simclr_ext.set_tf32(enabled)
            rows = simclr_ext.nt_xent(z1, z2, 0.1, reduction="none")
            direct = _op(z, z, labels, labels, torch.tensor(0.1), 0, enabled)[0]
            assert torch.equal(rows, direct), f"set_tf32({enabled}) did not select the allow_tf32={enabled} path"
        simclr_ext.set_tf32(None)
        for setting, enabled in (("highest", False), ("high", True)):
            torch.set_float32_matmul_precision(setting)
            rows = simclr_ext.nt_xent(z1, z2, 0.1, reduction="none")
            direct = _op(z, z, labels, labels, torch.tensor(0.1), 0, enabled)[0]
            assert torch.equal(rows, direct), f"precision {setting!r} did not select the allow_tf32={enabled} path"
        exact = _op(z, z, labels, labels, torch.tensor(0.1), 0, False)[0]
        loss64 = ref.nt_xent(z1.double(), z2.double(), 0.1, reduction="none")
        assert max_err(exact, loss64) < 1e-4, "the exact path is not full fp32"
    finally:
        simclr_ext.set_tf32(None)
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_noncontiguous_inputs(kind, dtype, gen):
    m, d = 90, 70
    base = torch.randn(m, 2 * d, generator=gen) if kind == "strided" else torch.randn(d, m, generator=gen)
    q = (base[:, ::2] if kind == "strided" else base.t()).to(DEV, dtype)
    assert not q.is_contiguous()
    labels = torch.arange(m // 2, device=DEV).repeat(2)
    q_leaf = q.detach().requires_grad_(True)
    c_leaf = q.detach().contiguous().requires_grad_(True)
    loss, _, _ = _op(q_leaf, q_leaf, labels, labels, torch.tensor(0.3), 0, False)
    loss_c, _, _ = _op(c_leaf, c_leaf, labels, labels, torch.tensor(0.3), 0, False)
    assert torch.equal(loss, loss_c)
    (g,) = torch.autograd.grad(loss.sum(), q_leaf)
    (g_c,) = torch.autograd.grad(loss_c.sum(), c_leaf)
    assert torch.equal(g, g_c)


def _poison_allocator(nbytes):
    """Leaves NaN-filled blocks in the caching allocator, so that fresh outputs start as NaN."""
    blocks = [torch.full((nbytes // 4,), math.nan, device=DEV) for _ in range(4)]
    del blocks


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_every_output_element_is_written(dtype, tf32, gen):
    """Outputs and workspaces start as NaN (deterministic mode's fill of uninitialized memory, and a
    poisoned allocator): every element of loss, lse, npos and both gradients must come out finite and
    right, including the padding rows and columns of the tiles (M, L, D are not tile multiples)."""
    m, l, d = 67, 150, 45
    q64, k64, ql, kl, offset = _inputs("slice", m, l, d, gen)
    fill = getattr(torch.utils, "deterministic", None)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = fill.fill_uninitialized_memory if fill is not None else None
    torch.use_deterministic_algorithms(True)
    if fill is not None:
        fill.fill_uninitialized_memory = True
    try:
        _poison_allocator(1 << 24)
        q, k = _leaf(q64.to(dtype), dtype), _leaf(k64.to(dtype), dtype)
        loss, lse, npos = _op(q, k, ql.to(DEV), kl.to(DEV), torch.tensor(0.2), offset, tf32)
        gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if fill is not None:
            fill.fill_uninitialized_memory = prev_fill
    for name, x in [("loss", loss), ("lse", lse), ("grad q", gq), ("grad k", gk)]:
        assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} elements not written"
    assert torch.equal(npos.cpu(), _positives(ql, kl, offset))
    q_r, k_r = _leaf(q64.to(dtype), torch.float64), _leaf(k64.to(dtype), torch.float64)
    loss_r = _ref_rows(q_r, k_r, ql.to(DEV), kl.to(DEV), 0.2, offset)
    gq_r, gk_r = torch.autograd.grad(loss_r.sum(), (q_r, k_r))
    loose = 0.05 if dtype in (torch.float16, torch.bfloat16) or tf32 else 1e-4
    assert max_err(loss, loss_r) < loose and max_err(gq, gq_r) < loose and max_err(gk, gk_r) < loose


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_reruns_are_bit_identical(dtype, tf32, gen):
    """No atomics: two runs give the same bits for loss, lse and both gradients."""
    q64, k64, ql, kl, offset = _inputs("slice", 300, 700, 150, gen)
    runs = []
    for _ in range(2):
        q, k = _leaf(q64.to(dtype), dtype), _leaf(k64.to(dtype), dtype)
        loss, lse, npos = _op(q, k, ql.to(DEV), kl.to(DEV), torch.tensor(0.1), offset, tf32)
        gq, gk = torch.autograd.grad((loss * 0.7).sum(), (q, k))
        runs.append((loss, lse, npos, gq, gk))
    for name, a, b in zip(["loss", "lse", "npos", "grad q", "grad k"], *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_degenerate_rows():
    """Zero vectors (norm clamped like F.normalize), a query whose only key is itself (empty
    denominator: lse = -inf, loss 0, zero gradient), an empty batch and NaN inputs."""
    z = torch.zeros(4, 5, device=DEV, dtype=torch.float64)
    z[0, 0] = 1.0
    z[2] = torch.tensor([1e-13, 0, 0, 0, 2e-13])  # below the clamp
    labels = torch.tensor([0, 1, 0, 1], device=DEV)
    q = z.clone().requires_grad_(True)
    loss, _, _ = _op(q, q, labels, labels, torch.tensor(0.5), 0, False)
    (g,) = torch.autograd.grad(loss.sum(), q)
    q_r = z.clone().requires_grad_(True)
    loss_r = _ref_rows(q_r, q_r, labels, labels, 0.5, 0)
    (g_r,) = torch.autograd.grad(loss_r.sum(), q_r)
    assert max_err(loss, loss_r) < 1e-12 and max_err(g, g_r) < 1e-12 * max(1.0, g_r.abs().max().item())

    one = torch.randn(1, 8, device=DEV, requires_grad=True)
    lab = torch.zeros(1, dtype=torch.long, device=DEV)
    loss, lse, npos = _op(one, one, lab, lab, torch.tensor(0.1), 0, False)
    assert loss.item() == 0 and lse.item() == -math.inf and npos.item() == 0
    (g,) = torch.autograd.grad(loss.sum(), one)
    assert torch.equal(g, torch.zeros_like(g))

    empty = torch.empty(0, 8, device=DEV, requires_grad=True)
    none = torch.empty(0, dtype=torch.long, device=DEV)
    loss, lse, npos = _op(empty, empty, none, none, torch.tensor(0.1), 0, False)
    assert loss.shape == lse.shape == npos.shape == (0,)
    keys = torch.randn(5, 8, device=DEV, requires_grad=True)
    loss, _, _ = _op(empty, keys, none, torch.zeros(5, dtype=torch.long, device=DEV), torch.tensor(0.1), -1, False)
    (gk,) = torch.autograd.grad(loss.sum(), keys, allow_unused=False)
    assert torch.equal(gk, torch.zeros_like(gk))

    bad = torch.randn(70, 8, device=DEV)
    bad[3, 2] = math.nan
    labels = torch.arange(35, device=DEV).repeat(2)
    loss, _, _ = _op(bad, bad, labels, labels, torch.tensor(0.1), 0, True)
    assert torch.isnan(loss).all(), "a NaN key enters every denominator: every row's loss must be NaN"


def test_device_and_dtype_errors_before_launch():
    q = torch.randn(4, 3, device=DEV)
    labels = torch.zeros(4, dtype=torch.long, device=DEV)
    with pytest.raises(RuntimeError, match="k must be on the device of q"):
        _op(q, q.cpu(), labels, labels.cpu(), torch.tensor(0.1), 0, True)
    with pytest.raises(RuntimeError, match="q_labels must be on the device of q"):
        _op(q, q, labels.cpu(), labels, torch.tensor(0.1), 0, True)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        _op(q, q.half(), labels, labels, torch.tensor(0.1), 0, True)
    with pytest.raises(RuntimeError, match="self_offset"):
        _op(q, q, labels, labels, torch.tensor(0.1), 1, True)
    with pytest.raises(RuntimeError, match="temperature"):
        _op(q, q, labels, labels, torch.tensor(0.0), 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_on_cuda(dtype, gen):
    m, l = 70, 100
    q64, k64, ql, kl, offset = _inputs("slice", m, l, 12, gen)
    q = q64.to(DEV, dtype).requires_grad_(True)
    k = k64.to(DEV, dtype).requires_grad_(True)
    args = (q, k, ql.to(DEV), kl.to(DEV), torch.tensor(0.3), offset, True)
    torch.library.opcheck(torch.ops.simclr_ext.ntxent.default, args)
    loss, lse, npos = _op(*args)
    bargs = (torch.rand(m, device=DEV), q.detach(), k.detach(), args[2], args[3], lse, npos, torch.tensor(0.3), offset, True)
    torch.library.opcheck(torch.ops.simclr_ext._ntxent_backward.default, bargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _rows_loss64(z, labels, rows, t, chunk=512):
    """Exact per-row NT-Xent (float64) of the given rows, computed a few rows at a time."""
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    out = []
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        s = zn[r] @ zn.T / t
        own = torch.arange(len(r), device=z.device)
        s[own, r] = -math.inf
        pos = labels[r][:, None] == labels[None, :]
        pos[own, r] = False
        lse = torch.logsumexp(s, dim=1)
        out.append(lse - torch.where(pos, s, torch.zeros_like(s)).sum(1) / pos.sum(1))
    return torch.cat(out)


def test_batch_65536_under_a_memory_cap_the_reference_cannot_fit(gen):
    """2N = 65536, D = 128, bf16 under a 3 GiB cap: the reference needs the 65536^2 matrix (8 GiB in bf16)
    and fails; the fused op runs forward and backward, and its losses match exact float64 rows."""
    n, d = 32768, 128
    z1 = torch.randn(n, d, generator=gen).to(DEV, torch.bfloat16)
    z2 = torch.randn(n, d, generator=gen).to(DEV, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3 * 2**30 / total))
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            ref.nt_xent(z1, z2, 0.5)
        torch.cuda.empty_cache()
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        rows = simclr_ext.nt_xent(a, b, 0.5, reduction="none")
        ga, gb = torch.autograd.grad(rows.mean(), (a, b))
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - before
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.isfinite(rows).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    # O((M + L) D): a few copies of the 16 MiB batch, far below the reference's 8 GiB matrix.
    assert peak_extra < 256 * 2**20, f"peak extra memory {peak_extra / 2**20:.0f} MiB"
    z = torch.cat([z1, z2])
    labels = torch.arange(n, device=DEV).repeat(2)
    check = torch.randperm(2 * n, generator=gen)[:1024].to(DEV)
    exact = _rows_loss64(z, labels, check, 0.5)
    assert max_err(rows[check], exact) < 0.05


def test_batch_262144_runs(gen):
    """2N = 262144, D = 128, bf16: forward and backward run, and sampled rows match float64."""
    n, d = 131072, 128
    z1 = torch.randn(n, d, generator=gen).to(DEV, torch.bfloat16).requires_grad_(True)
    z2 = torch.randn(n, d, generator=gen).to(DEV, torch.bfloat16).requires_grad_(True)
    rows = simclr_ext.nt_xent(z1, z2, 0.5, reduction="none")
    g1, g2 = torch.autograd.grad(rows.mean(), (z1, z2))
    assert torch.isfinite(rows).all() and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    z = torch.cat([z1.detach(), z2.detach()])
    labels = torch.arange(n, device=DEV).repeat(2)
    check = torch.randperm(2 * n, generator=gen)[:512].to(DEV)
    assert max_err(rows[check], _rows_loss64(z, labels, check, 0.5, chunk=128)) < 0.05
