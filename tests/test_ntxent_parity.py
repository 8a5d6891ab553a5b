"""NT-Xent's contract on every device (CPU always, CUDA when present): values and gradients of the fused
contrastive op against simclr_reference in float64, every dtype and precision path, odd shapes, label
layouts, degenerate rows, determinism. Inputs are drawn on the CPU from the test's seeded generator, so
both devices see the same numbers. What only a GPU can show (TF32 switch, split plans, path counters,
batches the reference cannot hold, device errors) is in test_ntxent_cuda_only.py."""
import itertools
import math

import pytest
import torch
from emulated_cuda import is_emulated
from parity import (
    CONTRASTIVE_CASES,
    DEVICE_PATHS,
    DEVICES,
    assert_equal_to_rounding,
    assert_matches_reference,
    compare_with_reference,
    contrastive_inputs,
    leaf,
    matmul_tf32,
    max_err,
    ntxent_op,
    positive_counts,
    reference_rows,
)

import simclr_ext
import simclr_reference as ref

_compare, _leaf = compare_with_reference, leaf  # shared with tests/test_fuzz.py

FLOAT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,d", list(itertools.product([1, 2, 3, 64, 257], [1, 3, 128, 300])))
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(n, d, temperature, dtype, device, gen):
    z1 = torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = torch.randn(n, d, generator=gen, dtype=dtype)
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, temperature),
             lambda a, b: ref.nt_xent(a, b, temperature), [z1, z2], dtype, gen, f"N={n} D={d} t={temperature}",
             device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d", [(1, 3), (3, 1), (64, 128), (129, 130)])
def test_nt_xent_half_inputs(n, d, dtype, device, gen):
    z1 = torch.randn(n, d, generator=gen).to(dtype)
    z2 = torch.randn(n, d, generator=gen).to(dtype)
    loss = simclr_ext.nt_xent(z1.to(device), z2.to(device), 0.1)
    assert loss.dtype == torch.float32, "half inputs are upcast: the loss is float32"
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.1), lambda a, b: ref.nt_xent(a, b, 0.1), [z1, z2], dtype, gen,
             f"{dtype} N={n} D={d}", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reductions(reduction, dtype, device, gen):
    z1 = torch.randn(33, 17, generator=gen, dtype=dtype)
    z2 = torch.randn(33, 17, generator=gen, dtype=dtype)
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.2, reduction=reduction),
             lambda a, b: ref.nt_xent(a, b, 0.2, reduction=reduction), [z1, z2], dtype, gen, reduction, device)


def _noncontiguous(rows, d, dtype, gen, kind, device):
    # The view is taken on the device: .to() of a view with gaps would copy it contiguous.
    if kind == "strided":
        return torch.randn(rows, 2 * d, generator=gen, dtype=dtype).to(device)[:, ::2]
    if kind == "transposed":
        return torch.randn(d, rows, generator=gen, dtype=dtype).to(device).t()
    return torch.randn(2 * rows, d, generator=gen, dtype=dtype).to(device)[::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["strided", "transposed", "row_step"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
def test_noncontiguous_inputs(kind, dtype, device, gen):
    z1 = _noncontiguous(37, 19, dtype, gen, kind, device)
    z2 = _noncontiguous(37, 19, dtype, gen, kind, device)
    assert not z1.is_contiguous()
    out = simclr_ext.nt_xent(z1, z2, 0.3)
    assert torch.equal(out, simclr_ext.nt_xent(z1.contiguous(), z2.contiguous(), 0.3))
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.3), lambda a, b: ref.nt_xent(a, b, 0.3), [z1, z2], dtype, gen,
             kind, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_noncontiguous_op_inputs_equal_contiguous(kind, dtype, device, gen):
    """The op itself (q is k) on a strided or transposed leaf: the same bits as on its contiguous copy,
    values and gradient."""
    m, d = 90, 70
    base = torch.randn(m, 2 * d, generator=gen) if kind == "strided" else torch.randn(d, m, generator=gen)
    base = base.to(device, dtype)  # then the view: .to() of a strided view would copy it contiguous
    q = base[:, ::2] if kind == "strided" else base.t()
    assert not q.is_contiguous()
    labels = torch.arange(m // 2, device=device).repeat(2)
    q_leaf = q.detach().requires_grad_(True)
    c_leaf = q.detach().contiguous().requires_grad_(True)
    loss, _, _ = ntxent_op(q_leaf, q_leaf, labels, labels, torch.tensor(0.3), 0, False)
    loss_c, _, _ = ntxent_op(c_leaf, c_leaf, labels, labels, torch.tensor(0.3), 0, False)
    assert torch.equal(loss, loss_c)
    (g,) = torch.autograd.grad(loss.sum(), q_leaf)
    (g_c,) = torch.autograd.grad(loss_c.sum(), c_leaf)
    assert torch.equal(g, g_c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("views", [3, 4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_view(views, dtype, device, gen):
    n, d = 21, 24
    z = torch.randn(views * n, d, generator=gen, dtype=dtype)
    labels = torch.arange(n, device=device).repeat(views)
    _compare(lambda a: simclr_ext.contrastive_loss(a, a, labels, labels, 0.1, self_offset=0),
             lambda a: ref.contrastive_loss(a, a, labels, labels, 0.1, self_offset=0), [z], dtype, gen,
             f"{views} views", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_supervised_labels_with_singletons(reduction, dtype, device, gen):
    # Classes 0..4 repeat; 100 and 101 occur once, so their rows have no positive (loss 0, not counted).
    m, d = 70, 33
    labels = torch.randint(0, 5, (m,), generator=gen)
    labels[3], labels[40] = 100, 101
    labels = labels.to(device)
    q = torch.randn(m, d, generator=gen, dtype=dtype)
    _compare(lambda a: simclr_ext.contrastive_loss(a, a, labels, labels, 0.07, self_offset=0, reduction=reduction),
             lambda a: ref.contrastive_loss(a, a, labels, labels, 0.07, self_offset=0, reduction=reduction), [q],
             dtype, gen, "supcon", device)
    per_row = simclr_ext.contrastive_loss(q.to(device), q.to(device), labels, labels, 0.07, self_offset=0,
                                          reduction="none")
    assert per_row[3].item() == 0 and per_row[40].item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,l,offset", [(5, 5, 0), (7, 300, 0), (7, 300, 150), (7, 300, 293), (129, 131, 2),
                                        (6, 40, None), (300, 7, None)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_queries_against_keys(m, l, offset, dtype, device, gen):
    d = 13
    k_labels = torch.randint(0, 9, (l,), generator=gen)
    if offset is None:
        q_labels = torch.randint(0, 9, (m,), generator=gen)
        q = torch.randn(m, d, generator=gen, dtype=dtype)
    else:
        q_labels = k_labels[offset:offset + m].clone()
        q = None
    k = torch.randn(l, d, generator=gen, dtype=dtype)
    if q is None:
        q = k[offset:offset + m].clone() + 0.01 * torch.randn(m, d, generator=gen, dtype=dtype)
    q_labels, k_labels = q_labels.to(device), k_labels.to(device)
    _compare(lambda a, b: simclr_ext.contrastive_loss(a, b, q_labels, k_labels, 0.2, self_offset=offset),
             lambda a, b: ref.contrastive_loss(a, b, q_labels, k_labels, 0.2, self_offset=offset), [q, k], dtype, gen,
             f"M={m} L={l} offset={offset}", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(1, 3), (37, 19), (130, 64)])
def test_swapping_the_views_gives_the_same_loss(n, d, reduction, dtype, device, gen):
    """nt_xent(a, b) == nt_xent(b, a), and NTXentLoss likewise (lightly's classic): values and the gradients
    of sum(w * loss) for a random w; per-row losses ("none") come back with their halves swapped. Equal to
    rounding only: the swapped call sums the same terms in another order."""
    a0 = torch.randn(n, d, generator=gen).to(device, dtype)
    b0 = torch.randn(n, d, generator=gen).to(device, dtype)
    w = (torch.rand(2 * n if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5).to(device)

    def halves_swapped(x):
        return torch.cat([x[n:], x[:n]]) if reduction == "none" else x

    def functional(x, y):
        return simclr_ext.nt_xent(x, y, 0.2, reduction=reduction)

    module = simclr_ext.NTXentLoss(temperature=0.2, reduction=reduction)
    for name, fn in (("nt_xent", functional), ("NTXentLoss", module)):
        a, b = _leaf(a0, device), _leaf(b0, device)
        a2, b2 = _leaf(a0, device), _leaf(b0, device)
        ab, ba = fn(a, b), fn(b2, a2)
        assert_equal_to_rounding(halves_swapped(ba), ab, dtype, f"{name}(b, a) vs {name}(a, b)")
        ga, gb = torch.autograd.grad((ab * w.to(ab.dtype)).sum(), (a, b))
        ga2, gb2 = torch.autograd.grad((ba * halves_swapped(w).to(ba.dtype)).sum(), (a2, b2))
        assert_equal_to_rounding(ga2, ga, dtype, f"{name}: grad of a")
        assert_equal_to_rounding(gb2, gb, dtype, f"{name}: grad of b")


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
@pytest.mark.parametrize("kind,m,l,d", CONTRASTIVE_CASES)
def test_matches_reference(kind, m, l, d, device, dtype, tf32, gen):
    """The op's per-row losses, positive counts and the gradients of sum(w * loss) (w random, not 1) for q
    and k, against the reference in float64, allowed 2x the error of the reference run in the same dtype
    on the same device (TF32 matmuls for the TF32 path). q and k are separate leaves even where q is a
    slice of k."""
    t = 0.1 if kind != "views" else 0.5
    q64, k64, ql, kl, offset = contrastive_inputs(kind, m, l, d, gen)
    q_in, k_in = q64.to(dtype), k64.to(dtype)  # the values every run starts from
    ql, kl = ql.to(device), kl.to(device)
    w = torch.rand(m, generator=gen, dtype=torch.float64).to(device) + 0.5

    q, k = _leaf(q_in, device), _leaf(k_in, device)
    # The temperature in float64: torch.tensor(0.1) would be float32's 0.1, 1.5e-8 off the reference's.
    loss, lse, npos = ntxent_op(q, k, ql, kl, torch.tensor(t, dtype=torch.float64), offset, tf32)
    assert loss.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(npos.cpu(), positive_counts(ql.cpu(), kl.cpu(), offset))
    gq, gk = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), (q, k))

    q_r, k_r = _leaf(q_in, device, torch.float64), _leaf(k_in, device, torch.float64)
    loss_r = reference_rows(q_r, k_r, ql, kl, t, offset)
    gq_r, gk_r = torch.autograd.grad((loss_r * w).sum(), (q_r, k_r))

    with matmul_tf32(tf32):
        q_s, k_s = _leaf(q_in, device), _leaf(k_in, device)
        loss_s = reference_rows(q_s, k_s, ql, kl, t, offset)
        gq_s, gk_s = torch.autograd.grad((loss_s * w.to(dtype)).sum(), (q_s, k_s))

    assert torch.isfinite(lse).all(), "every row of these cases has keys in its denominator"
    assert_matches_reference(loss, loss_s, loss_r, dtype, f"{kind} loss")
    assert gq.dtype == dtype and gq.shape == q.shape and gk.dtype == dtype and gk.shape == k.shape
    assert_matches_reference(gq, gq_s, gq_r, dtype, f"{kind} grad q")
    assert_matches_reference(gk, gk_s, gk_r, dtype, f"{kind} grad k")


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_lse_matches_reference(device, dtype, tf32, gen):
    """The saved log-sum-exp is the one of the denominator (self excluded), not just any consistent value."""
    q64, k64, ql, kl, offset = contrastive_inputs("slice", 77, 150, 40, gen)
    _, lse, _ = ntxent_op(q64.to(device, dtype), k64.to(device, dtype), ql.to(device), kl.to(device),
                          torch.tensor(0.2, dtype=torch.float64), offset, tf32)
    s = torch.nn.functional.normalize(q64, dim=1) @ torch.nn.functional.normalize(k64, dim=1).T / 0.2
    rows = torch.arange(77)
    s[rows, rows + offset] = -math.inf
    lse_ref = torch.logsumexp(s, dim=1)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 0.1)
    assert max_err(lse.cpu(), lse_ref) < (tol if not tf32 else 0.05)


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_public_api_on_every_device(device, dtype, tf32, gen):
    """nt_xent and NTXentLoss take the device's tensors with no change in user code, and allow_tf32 selects
    the path."""
    n, d = 100, 65
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a, b = _leaf(z1, device, dtype), _leaf(z2, device, dtype)
    loss = simclr_ext.nt_xent(a, b, 0.5, allow_tf32=tf32)
    module_loss = simclr_ext.NTXentLoss(temperature=0.5, allow_tf32=tf32)(a, b)
    assert loss.device.type == device and torch.equal(loss, module_loss)
    ga, gb = torch.autograd.grad(loss, (a, b))
    a_r, b_r = _leaf(z1, device), _leaf(z2, device)
    loss_r = ref.nt_xent(a_r, b_r, 0.5)
    ga_r, gb_r = torch.autograd.grad(loss_r, (a_r, b_r))
    with matmul_tf32(tf32):
        a_s, b_s = _leaf(z1, device, dtype), _leaf(z2, device, dtype)
        loss_s = ref.nt_xent(a_s, b_s, 0.5)
        ga_s, gb_s = torch.autograd.grad(loss_s, (a_s, b_s))
    assert_matches_reference(loss, loss_s, loss_r, dtype, "nt_xent")
    assert_matches_reference(ga, ga_s, ga_r, dtype, "nt_xent grad z1")
    assert_matches_reference(gb, gb_s, gb_r, dtype, "nt_xent grad z2")


def _poison_allocator(nbytes):
    """Leaves NaN-filled blocks in the CUDA caching allocator, so that fresh outputs start as NaN."""
    blocks = [torch.full((nbytes // 4,), math.nan, device="cuda") for _ in range(4)]
    del blocks


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_every_output_element_is_written(device, dtype, tf32, gen):
    """Outputs and workspaces start as NaN (deterministic mode's fill of uninitialized memory, and on CUDA a
    poisoned allocator): every element of loss, lse, npos and both gradients must come out finite and
    right, including the padding rows and columns of the tiles (M, L, D are not tile multiples)."""
    m, l, d = 67, 150, 45
    q64, k64, ql, kl, offset = contrastive_inputs("slice", m, l, d, gen)
    fill = getattr(torch.utils, "deterministic", None)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = fill.fill_uninitialized_memory if fill is not None else None
    torch.use_deterministic_algorithms(True)
    if fill is not None:
        fill.fill_uninitialized_memory = True
    try:
        if device == "cuda":
            _poison_allocator(1 << 24)
        q, k = _leaf(q64, device, dtype), _leaf(k64, device, dtype)
        loss, lse, npos = ntxent_op(q, k, ql.to(device), kl.to(device), torch.tensor(0.2), offset, tf32)
        gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if fill is not None:
            fill.fill_uninitialized_memory = prev_fill
    for name, x in [("loss", loss), ("lse", lse), ("grad q", gq), ("grad k", gk)]:
        assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} elements not written"
    assert torch.equal(npos.cpu(), positive_counts(ql, kl, offset))
    q_r, k_r = _leaf(q64.to(dtype), device, torch.float64), _leaf(k64.to(dtype), device, torch.float64)
    loss_r = reference_rows(q_r, k_r, ql.to(device), kl.to(device), 0.2, offset)
    gq_r, gk_r = torch.autograd.grad(loss_r.sum(), (q_r, k_r))
    loose = 0.05 if dtype in (torch.float16, torch.bfloat16) or tf32 else 1e-4
    assert max_err(loss, loss_r) < loose and max_err(gq, gq_r) < loose and max_err(gk, gk_r) < loose


@pytest.mark.parametrize("device,dtype,tf32", DEVICE_PATHS)
def test_reruns_are_bit_identical(device, dtype, tf32, gen):
    """No atomics: two runs give the same bits for loss, lse, npos and both gradients (split plans on the
    emulated GPU: 4 SMs)."""
    m, l, d = (70, 200, 100) if is_emulated(device) else (300, 700, 150)
    q64, k64, ql, kl, offset = contrastive_inputs("slice", m, l, d, gen)
    runs = []
    for _ in range(2):
        q, k = _leaf(q64, device, dtype), _leaf(k64, device, dtype)
        loss, lse, npos = ntxent_op(q, k, ql.to(device), kl.to(device), torch.tensor(0.1), offset, tf32)
        gq, gk = torch.autograd.grad((loss * 0.7).sum(), (q, k))
        runs.append((loss, lse, npos, gq, gk))
    for name, a, b in zip(["loss", "lse", "npos", "grad q", "grad k"], *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_rows(device):
    """Zero vectors (norm clamped like F.normalize), a query whose only key is itself (empty
    denominator: lse = -inf, loss 0, zero gradient), an empty batch and NaN inputs."""
    z = torch.zeros(4, 5, device=device, dtype=torch.float64)
    z[0, 0] = 1.0
    z[2] = torch.tensor([1e-13, 0, 0, 0, 2e-13])  # below the clamp
    labels = torch.tensor([0, 1, 0, 1], device=device)
    q = z.clone().requires_grad_(True)
    loss, _, _ = ntxent_op(q, q, labels, labels, torch.tensor(0.5), 0, False)
    (g,) = torch.autograd.grad(loss.sum(), q)
    q_r = z.clone().requires_grad_(True)
    loss_r = reference_rows(q_r, q_r, labels, labels, 0.5, 0)
    (g_r,) = torch.autograd.grad(loss_r.sum(), q_r)
    assert max_err(loss, loss_r) < 1e-12 and max_err(g, g_r) < 1e-12 * max(1.0, g_r.abs().max().item())

    one = torch.randn(1, 8, device=device, requires_grad=True)
    lab = torch.zeros(1, dtype=torch.long, device=device)
    loss, lse, npos = ntxent_op(one, one, lab, lab, torch.tensor(0.1), 0, False)
    assert loss.item() == 0 and lse.item() == -math.inf and npos.item() == 0
    (g,) = torch.autograd.grad(loss.sum(), one)
    assert torch.equal(g, torch.zeros_like(g))

    empty = torch.empty(0, 8, device=device, requires_grad=True)
    none = torch.empty(0, dtype=torch.long, device=device)
    loss, lse, npos = ntxent_op(empty, empty, none, none, torch.tensor(0.1), 0, False)
    assert loss.shape == lse.shape == npos.shape == (0,)
    keys = torch.randn(5, 8, device=device, requires_grad=True)
    loss, _, _ = ntxent_op(empty, keys, none, torch.zeros(5, dtype=torch.long, device=device), torch.tensor(0.1), -1,
                           False)
    (gk,) = torch.autograd.grad(loss.sum(), keys, allow_unused=False)
    assert torch.equal(gk, torch.zeros_like(gk))

    bad = torch.randn(70, 8, device=device)
    bad[3, 2] = math.nan
    labels = torch.arange(35, device=device).repeat(2)
    loss, _, _ = ntxent_op(bad, bad, labels, labels, torch.tensor(0.1), 0, True)
    assert torch.isnan(loss).all(), "a NaN key enters every denominator: every row's loss must be NaN"


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_without_positives_give_zero_not_nan(device, gen):
    q = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.arange(6, device=device)
    loss = simclr_ext.contrastive_loss(q, q, labels, labels, 0.5, self_offset=0)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, q)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, gen):
    q = torch.randn(9, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    k = torch.randn(12, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    q_labels = torch.randint(0, 3, (9,), generator=gen)
    k_labels = torch.cat([q_labels, torch.randint(0, 3, (3,), generator=gen)]).to(device)
    q_labels = q_labels.to(device)
    fast = is_emulated(device)  # a random projection: a few calls of the emulated kernels, not hundreds
    for offset in (None, 0, 3):
        assert torch.autograd.gradcheck(
            lambda a, b, offset=offset: simclr_ext.contrastive_loss(
                a, b, q_labels if offset != 3 else k_labels[3:12], k_labels, 0.3, self_offset=offset,
                reduction="none"), (q, k), fast_mode=fast)
    z1 = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    z2 = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: simclr_ext.nt_xent(a, b, 0.1), (z1, z2), fast_mode=fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 5, 64])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0])
def test_identical_embeddings_closed_form(n, temperature, device, gen):
    # All 2N embeddings equal: every logit is 1/t, so each anchor's loss is log(2N - 1).
    v = torch.randn(1, 16, generator=gen, dtype=torch.float64).to(device)
    z = v.expand(n, 16)
    loss = simclr_ext.nt_xent(z, z, temperature)
    assert abs(loss.item() - torch.log(torch.tensor(2.0 * n - 1, dtype=torch.float64)).item()) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_vectors_behave_like_f_normalize(dtype, device, gen):
    z1 = torch.randn(8, 6, generator=gen, dtype=dtype)
    z2 = torch.randn(8, 6, generator=gen, dtype=dtype)
    z1[2] = 0
    z2[5] = 0
    z2[0] = 1e-14  # below the clamp: scaled by 1/eps like F.normalize does
    _compare(lambda a, b: simclr_ext.nt_xent(a, b, 0.5), lambda a, b: ref.nt_xent(a, b, 0.5), [z1, z2], dtype, gen,
             "zero rows", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_propagate_nan(bad, device, gen):
    z1 = torch.randn(10, 8, generator=gen).to(device).requires_grad_(True)
    z2 = torch.randn(10, 8, generator=gen).to(device)
    with torch.no_grad():
        z1[4, 3] = bad
    loss = simclr_ext.nt_xent(z1, z2, 0.5)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, z1)
    assert torch.isnan(g).any()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_calls(device, gen):
    n = 70 if is_emulated(device) else 300
    z1 = torch.randn(n, 64, generator=gen).to(device).requires_grad_(True)
    z2 = torch.randn(n, 64, generator=gen).to(device).requires_grad_(True)
    runs = []
    for _ in range(2):
        loss = simclr_ext.nt_xent(z1, z2, 0.1)
        runs.append((loss, *torch.autograd.grad(loss, (z1, z2))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_no_double_backward(device, gen):
    z1 = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    z2 = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(simclr_ext.nt_xent(z1, z2), z1, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), z1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d", [(1, 3), (17, 9), (64, 128)])
def test_plain_baseline_is_nt_xent(n, d, device, gen):
    """simclr_reference.nt_xent_plain (the benchmarks' baseline, F.cross_entropy on the masked logits) is
    the same loss as the oracle, value and gradients, in float64."""
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    plain = ref.nt_xent_plain(z1, z2, 0.3)
    oracle = ref.nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(plain, oracle, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(plain, (z1, z2)), torch.autograd.grad(oracle, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
