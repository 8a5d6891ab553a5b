"""What only a GPU run of the contrastive op can show: the CUDA path counters (the symmetric and the general
backward), the split plans of large batches, the global TF32 switch, device errors, opcheck on CUDA tensors,
a CPU temperature with CUDA inputs, the float16 operand scale, batches the reference cannot hold and CUDA
graphs under torch.compile.
The op's contract on every device (CUDA included) is test_ntxent_parity.py. Every test is marked `cuda`
and skipped (by conftest.py) where torch sees no GPU."""
import copy
import math

import pytest
import torch
from parity import (
    CONTRASTIVE_CASES,
    OPCHECK_BACKWARD_UTILS,
    PRECISION_PATHS,
    assert_matches_reference,
    contrastive_inputs,
    matmul_tf32,
    max_err,
    ntxent_op,
    reference_rows,
)
from torch._dynamo.utils import counters

import simclr_ext
import simclr_reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

DEV = "cuda"
PATHS = PRECISION_PATHS
_op = ntxent_op


def _leaf(x, dtype):
    return x.detach().to(DEV, dtype).requires_grad_(True)


SYMMETRIC_CASES = [c for c in CONTRASTIVE_CASES if c.values[0] in ("simclr", "views", "supcon")]


def _path_counts():
    return {k: v for k, v in simclr_ext.ops.ntxent_path_counts().items() if v}


@pytest.mark.parametrize("dtype,tf32", PATHS)
@pytest.mark.parametrize("kind,m,l,d", SYMMETRIC_CASES)
def test_symmetric_path_matches_reference(kind, m, l, d, dtype, tf32, gen):
    """q is k (one leaf, one labels tensor, self_offset 0): the single symmetric backward pass
    (H = dS + dS^T) gives the leaf's whole gradient; checked against float64 with a random grad_output,
    and the path counters show that this pass, not the general two, ran."""
    t = 0.1 if kind != "views" else 0.5
    z64, _, labels, _, _ = contrastive_inputs(kind, m, l, d, gen)
    z_in = z64.to(dtype)
    labels = labels.to(DEV)
    w = torch.rand(m, generator=gen, dtype=torch.float64).to(DEV) + 0.5
    z = _leaf(z_in, dtype)
    simclr_ext.ops.reset_ntxent_path_counts()
    loss, _, _ = _op(z, z, labels, labels, torch.tensor(t, dtype=torch.float64), 0, tf32)
    (g,) = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), z)
    assert _path_counts() == {"cuda_forward": 1, "cuda_backward_symmetric": 1}
    z_r = _leaf(z_in, torch.float64)
    loss_r = reference_rows(z_r, z_r, labels, labels, t, 0)
    (g_r,) = torch.autograd.grad((loss_r * w).sum(), z_r)
    with matmul_tf32(tf32):
        z_s = _leaf(z_in, dtype)
        loss_s = reference_rows(z_s, z_s, labels, labels, t, 0)
        (g_s,) = torch.autograd.grad((loss_s * w.to(dtype)).sum(), z_s)
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
    q64, k64, ql, kl, offset = contrastive_inputs("slice", m, l, 12, gen)
    q = q64.to(DEV, dtype).requires_grad_(True)
    k = k64.to(DEV, dtype).requires_grad_(True)
    args = (q, k, ql.to(DEV), kl.to(DEV), torch.tensor(0.3), offset, True)
    torch.library.opcheck(torch.ops.simclr_ext.ntxent.default, args)
    loss, lse, npos = _op(*args)
    bargs = (torch.rand(m, device=DEV), q.detach(), k.detach(), args[2], args[3], lse, npos,
             torch.tensor(0.3), offset, True)
    torch.library.opcheck(torch.ops.simclr_ext._ntxent_backward.default, bargs, test_utils=OPCHECK_BACKWARD_UTILS)


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


def test_cpu_temperature_with_cuda_inputs(gen):
    z1, z2 = torch.randn(2, 40, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    simclr_ext.nt_xent(z1.to(DEV), z2.to(DEV), t).backward()
    assert t.grad.device.type == "cpu"
    ours = t.grad.clone()
    t.grad = None
    ref.nt_xent(z1, z2, t).backward()
    torch.testing.assert_close(ours, t.grad, rtol=1e-10, atol=0)


def _train(base, batches, temperature, compiled):
    """SGD steps of a linear projection under NTXentLoss; returns per step (loss, gradients) and the final
    parameters. The compiled run is torch.compile(mode="reduce-overhead"): CUDA graphs for the forward and
    the backward graph (the fused op's forward and backward kernels inside them)."""
    model = copy.deepcopy(base).to(DEV)
    t = torch.nn.Parameter(torch.tensor(0.2, device=DEV)) if temperature == "parameter" else 0.2
    loss_fn = simclr_ext.NTXentLoss(temperature=t)
    params = [*model.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)

    def forward(x1, x2):
        return loss_fn(model(x1), model(x2))

    step = torch.compile(forward, mode="reduce-overhead") if compiled else forward
    history = []
    for x1, x2 in batches:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        loss = step(x1, x2)
        loss.backward()
        # Copies now: a CUDA graph's outputs are overwritten by its next replay.
        history.append((loss.detach().clone(), [p.grad.clone() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history, [p.detach().clone() for p in params]


@pytest.mark.parametrize("temperature", ["float", "parameter"])
def test_reduce_overhead_compile_matches_eager(temperature, gen):
    """torch.compile(mode="reduce-overhead") of a training step using NTXentLoss gives the eager losses,
    gradients and parameters over several steps (warm-up, CUDA-graph recording, replays). With the
    temperature a CUDA Parameter every input of the graphs is on the device and the op never reads a value on
    the host, so inductor must run CUDA graphs, not fall back (a float temperature is a CPU scalar: inductor
    may skip graphs for it, the results must still be eager's)."""
    d_in, d, n, steps = 24, 16, 48, 5
    base = torch.nn.Linear(d_in, d)  # initialised from the test's seeded global generator
    batches = [(torch.randn(n, d_in, generator=gen).to(DEV), torch.randn(n, d_in, generator=gen).to(DEV))
               for _ in range(steps)]
    torch._dynamo.reset()
    counters.clear()
    try:
        eager, eager_params = _train(base, batches, temperature, compiled=False)
        graphed, graphed_params = _train(base, batches, temperature, compiled=True)
        skips = counters["inductor"]["cudagraph_skips"]
    finally:
        torch._dynamo.reset()
    for i, ((loss_e, grads_e), (loss_c, grads_c)) in enumerate(zip(eager, graphed)):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"step {i} loss: {m}")
        for j, (g_c, g_e) in enumerate(zip(grads_c, grads_e)):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, i=i, j=j: f"step {i} grad {j}: {m}")
    for p_c, p_e in zip(graphed_params, eager_params):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
    assert len(graphed) == steps and all(torch.isfinite(loss) for loss, _ in graphed)
    if temperature == "parameter":
        assert skips == 0, f"inductor skipped CUDA graphs {skips} time(s): see the log for the reason"


def test_fp16_operand_scale_ignores_rows_without_positives(gen):
    """The float16 products run on dL/dcos / 2^e with 2^e from the largest incoming gradient of a row that has
    a positive: a huge gradient on a row without positives (its loss is the constant 0) must not shrink the
    other rows' operands into float16 underflow."""
    n, d = 512, 64
    z = torch.randn(n, d, generator=gen)
    labels = torch.arange(n) // 2
    labels[-8:] = torch.arange(10_000, 10_008)  # 8 singletons: no positive
    grad_out = torch.full((n,), 1.0 / n, dtype=torch.float64)
    grad_out[-8:] = 1e4

    def grad_of(x, lab):
        loss = simclr_ext.contrastive_loss(x, x, lab, lab, 0.1, self_offset=0, reduction="none") \
            if x.is_cuda else ref.contrastive_loss(x, x, lab, lab, 0.1, self_offset=0, reduction="none")
        return torch.autograd.grad(loss, x, grad_out.to(x.device, loss.dtype))[0]

    z16 = z.half()
    ours = grad_of(z16.to(DEV).requires_grad_(), labels.to(DEV))
    same = grad_of(z16.float().requires_grad_(), labels)  # float32 from the same float16 values
    ref64 = grad_of(z16.double().requires_grad_(), labels)
    # Before the bound ignored such rows, the operands g p / 2^e fell below float16's subnormals and the
    # softmax part of the gradient was lost: errors of the gradients' own size.
    assert_matches_reference(ours.cpu().double(), same.double(), ref64, torch.float16, "grad")
