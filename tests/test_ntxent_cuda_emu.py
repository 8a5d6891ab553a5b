"""What test_ntxent_cuda_only.py checks on a GPU, checked on the CUDA kernels' emulation (cuda-emu) at small
shapes: the CUDA path counters (symmetric and general backward), split plans against the unsplit plan (the
emulated SM count decides them), bit-identical reruns, a temperature read from memory by the kernels, the
float16 operand scale, and the emulation's own guards (a launch beyond the device's shared memory)."""
import emulated_cuda
import pytest
import torch
from emulated_cuda import CUDA_EMU
from parity import (
    CONTRASTIVE_CASES,
    PRECISION_PATHS,
    assert_matches_reference,
    contrastive_inputs,
    matmul_tf32,
    max_err,
    ntxent_op,
    reference_rows,
)

import simclr_ext
import simclr_reference as ref

pytestmark = pytest.mark.cuda_emu

# The route fixture (conftest.py) switches on this parameter: every test here runs the emulated kernels.
ON_EMU = pytest.mark.parametrize("device", [pytest.param(CUDA_EMU, id="cuda-emu")])

SMALL_SYMMETRIC = [c for c in CONTRASTIVE_CASES if c.values[0] in ("simclr", "views", "supcon") and c.values[1] <= 130]


@pytest.fixture
def emulated_sms():
    """Sets the emulated GPU's SM count for a test, then restores the default (4)."""
    yield emulated_cuda.set_device
    emulated_cuda.set_device(4)


def _path_counts():
    return {k: v for k, v in simclr_ext.ops.ntxent_path_counts().items() if v}


@ON_EMU
@pytest.mark.parametrize("dtype,tf32", PRECISION_PATHS)
@pytest.mark.parametrize("kind,m,l,d", SMALL_SYMMETRIC)
def test_symmetric_path_matches_reference(kind, m, l, d, dtype, tf32, device, gen):
    """q is k: the one symmetric backward pass runs (path counters) and matches float64."""
    t = 0.1 if kind != "views" else 0.5
    z64, _, labels, _, _ = contrastive_inputs(kind, m, l, d, gen)
    z_in = z64.to(dtype)
    w = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    z = z_in.clone().requires_grad_(True)
    simclr_ext.ops.reset_ntxent_path_counts()
    loss, _, _ = ntxent_op(z, z, labels, labels, torch.tensor(t, dtype=torch.float64), 0, tf32)
    (g,) = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), z)
    assert _path_counts() == {"cuda_forward": 1, "cuda_backward_symmetric": 1}
    z_r = z_in.double().requires_grad_(True)
    loss_r = reference_rows(z_r, z_r, labels, labels, t, 0)
    (g_r,) = torch.autograd.grad((loss_r * w).sum(), z_r)
    with matmul_tf32(tf32):
        z_s = z_in.clone().requires_grad_(True)
        loss_s = reference_rows(z_s, z_s, labels, labels, t, 0)
        (g_s,) = torch.autograd.grad((loss_s * w.to(dtype)).sum(), z_s)
    assert_matches_reference(loss, loss_s, loss_r, dtype, f"{kind} loss")
    assert_matches_reference(g, g_s, g_r, dtype, f"{kind} symmetric grad")


@ON_EMU
def test_general_path_counted_for_distinct_keys(device, gen):
    q = torch.randn(50, 20, generator=gen).requires_grad_(True)
    k = q.detach().clone().requires_grad_(True)
    labels = torch.arange(25).repeat(2)
    simclr_ext.ops.reset_ntxent_path_counts()
    loss, _, _ = ntxent_op(q, k, labels, labels, torch.tensor(0.2), 0, False)
    _, gk = torch.autograd.grad(loss.sum(), (q, k))
    assert _path_counts() == {"cuda_forward": 1, "cuda_backward_general": 1}
    assert torch.count_nonzero(gk) > 0


def _loss_and_grad(z_in, labels, tf32, symmetric):
    q = z_in.clone().requires_grad_(True)
    k = q if symmetric else z_in.clone().requires_grad_(True)
    loss, lse, _ = ntxent_op(q, k, labels, labels, torch.tensor(0.2), 0, tf32)
    if symmetric:
        return loss, lse, torch.autograd.grad(loss.sum(), q)[0]
    gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    return loss, lse, gq.double() + gk.double()


@ON_EMU
@pytest.mark.parametrize("dtype,tf32", [pytest.param(torch.float32, False, id="fp32"),
                                        pytest.param(torch.bfloat16, False, id="bf16")])
def test_split_plans_equal_the_unsplit_plan(dtype, tf32, device, gen, emulated_sms):
    """2N = 258 (5 tiles): one SM gives no split of the forward, 132 SMs (an H100) up to 5 splits in every
    pass, merged in split order. Same loss and gradient to rounding; split reruns bit-identical; the symmetric
    pass equals the general dQ + dK passes."""
    n2, d = 258, 40
    z_in = torch.randn(n2, d, generator=gen).to(dtype)
    labels = torch.arange(n2 // 2).repeat(2)
    emulated_sms(1)
    loss_1, lse_1, g_1 = _loss_and_grad(z_in, labels, tf32, symmetric=True)
    emulated_sms(132)
    loss_s, lse_s, g_s = _loss_and_grad(z_in, labels, tf32, symmetric=True)
    loss_s2, _, g_s2 = _loss_and_grad(z_in, labels, tf32, symmetric=True)
    _, _, g_general = _loss_and_grad(z_in, labels, tf32, symmetric=False)
    assert torch.equal(loss_s, loss_s2) and torch.equal(g_s, g_s2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for what, a, b in [("loss", loss_s, loss_1), ("lse", lse_s, lse_1), ("grad", g_s, g_1),
                       ("symmetric vs general", g_s, g_general)]:
        scale = max(1.0, b.double().abs().max().item())
        assert max_err(a, b) <= tol * scale, f"{what}: {max_err(a, b):.3e}"


@ON_EMU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_read_by_the_kernels(dtype, device, gen):
    """A float32 temperature is read by the emulated kernels from memory (Temperature::inv_on_device), a
    float64 one passed by value: the same losses and gradients to rounding, the temperature's gradient too."""
    z_in = torch.randn(70, 33, generator=gen, dtype=dtype)
    labels = torch.arange(35).repeat(2)
    out = {}
    for t_dtype in (torch.float32, torch.float64):
        z = z_in.clone().requires_grad_(True)
        t = torch.tensor(0.25, dtype=t_dtype, requires_grad=True)
        loss = simclr_ext.contrastive_loss(z, z, labels, labels, t, self_offset=0)
        out[t_dtype] = (loss, *torch.autograd.grad(loss, (z, t)))
    for a, b in zip(out[torch.float32], out[torch.float64]):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.double().abs().max().item())


@ON_EMU
def test_fp16_operand_scale_ignores_rows_without_positives(device, gen):
    """A huge incoming gradient on rows without positives must not shrink the other rows' float16 operands
    into underflow (test_ntxent_cuda_only.py's case at 2N = 130)."""
    n, d = 130, 32
    z = torch.randn(n, d, generator=gen)
    labels = torch.arange(n) // 2
    labels[-8:] = torch.arange(10_000, 10_008)
    grad_out = torch.full((n,), 1.0 / n, dtype=torch.float64)
    grad_out[-8:] = 1e4

    def grad_of(x, fused):
        f = simclr_ext.contrastive_loss if fused else ref.contrastive_loss
        loss = f(x, x, labels, labels, 0.1, self_offset=0, reduction="none")
        return torch.autograd.grad(loss, x, grad_out.to(loss.dtype))[0]

    z16 = z.half()
    ours = grad_of(z16.clone().requires_grad_(), True)
    same = grad_of(z16.float().requires_grad_(), False)
    ref64 = grad_of(z16.double().requires_grad_(), False)
    assert_matches_reference(ours.double(), same.double(), ref64, torch.float16, "grad")


@ON_EMU
def test_shared_memory_beyond_the_device_fails_clearly(device, gen, emulated_sms):
    """A device whose opt-in limit is below the forward's tiles (float64 needs ~70 KB): the orchestration
    refuses before any launch, naming the bytes."""
    emulated_sms(4, 48 * 1024)
    z = torch.randn(10, 300, generator=gen, dtype=torch.float64)
    labels = torch.arange(5).repeat(2)
    with pytest.raises(RuntimeError, match="bytes of shared memory per block, the device allows 49152"):
        ntxent_op(z, z, labels, labels, torch.tensor(0.2), 0, False)
