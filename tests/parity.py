"""Tolerances of the parity tests, written once: the fused op's error against a float64 reference may be
at most ~2x the error of the reference itself computed in the same dtype (flash-attention's rule), plus
a small absolute floor for entries whose reference error happens to be ~0. Also what every device's contract
shares: DEVICES, the precision paths per device, the opcheck list and the contrastive op's random inputs."""
import contextlib
import math

import pytest
import torch
from emulated_cuda import CUDA_EMU, is_emulated

import simclr_reference as ref

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(ours, ref_same_dtype, ref64, dtype, what, magnitude=1.0):
    """ours vs the float64 reference, allowed 2x the error the reference makes in `dtype`. magnitude: the
    size of the terms the quantity sums (default 1; 1 / temperature for scores cos / t at a tiny t), the
    scale of the rounding floor when they cancel to ~0 (a D = 1 gradient)."""
    assert ours.shape == ref64.shape, f"{what}: shape {list(ours.shape)} != {list(ref64.shape)}"
    err = max_err(ours, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    if math.isnan(ref_err):  # the textbook formula breaks down in `dtype` (0 * inf at a 1e-3 temperature in
        ref_err = 0.0        # float16): no allowance from it, the float64 reference alone judges
    bound = 2 * ref_err + ATOL[dtype] * max(magnitude, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (reference's own {dtype} error {ref_err:.3e})"


# (dtype, allow_tf32): every precision path of the CUDA kernels. float32 runs both the exact FFMA path and TF32.
PRECISION_PATHS = [
    pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="tf32"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16"),
]

# The backward op deliberately has no derivative of its own (test_no_double_backward), so opcheck's
# aot_dispatch checks, which differentiate it, are left out for it.
OPCHECK_BACKWARD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")

# One contract per op over DEVICES: CPU always; cuda-emu, the CUDA kernels run on the CPU by their emulation
# (tests/emulated_cuda.py: CPU tensors, the ops routed to the emulated kernels while the test runs; its
# large-shape cases are left out by conftest.py, EMU_MAX_*); CUDA marked `cuda` (skipped without a GPU).
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
EMU_MARKS = [pytest.mark.cuda_emu]
DEVICES = ["cpu", pytest.param(CUDA_EMU, id="cuda-emu", marks=EMU_MARKS), pytest.param("cuda", marks=CUDA_MARKS)]
_DEVICE_MARKS = (("cpu", "cpu", []), (CUDA_EMU, "cuda-emu", EMU_MARKS), ("cuda", "cuda", CUDA_MARKS))

# What cuda-emu runs of each test (conftest.py deselects the rest, shown in the summary): cases up to these
# sizes, at most EMU_MAX_CASES of them per test function, spread over its parameter grid. The emulation runs
# one OS thread per CUDA thread (a context switch per barrier and thread), about 10^3 times slower than the CPU
# op; these sizes still cover edge tiles, several tiles per block, several D chunks and split plans.
EMU_MAX_ROWS = 130
EMU_MAX_DIM = 130
EMU_MAX_CASES = 4


def device_paths(paths=PRECISION_PATHS):
    """(device, dtype, allow_tf32) for every device and precision path it has: TF32 exists on CUDA (and its
    emulation) only."""
    out = []
    for device, name, marks in _DEVICE_MARKS:
        for path in paths:
            dtype, tf32 = path.values
            if not tf32 or name != "cpu":
                out.append(pytest.param(device, dtype, tf32, id=f"{name}-{path.id}", marks=marks))
    return out


def on_cuda(device):
    """Whether `device` runs the CUDA kernels: a GPU or their emulation."""
    return device == "cuda" or is_emulated(device)


def backend(device):
    """The backend a device's calls run, as the path and pass counters name it: "cuda" for a GPU and for its
    emulation, else "cpu"."""
    return "cuda" if on_cuda(device) else "cpu"


DEVICE_PATHS = device_paths()


def tolerance_dtype(dtype, tf32):
    """The dtype whose tolerance judges a path: TF32 products carry 10-bit mantissas, judged like float16."""
    return torch.float16 if tf32 else dtype


@contextlib.contextmanager
def matmul_tf32(enabled):
    """torch's own matmuls in TF32 or not, for a reference run in the same precision as the op's path. CUDA
    has the switch; on the CPU (where the cuda-emu device's tensors live) torch has no TF32, so there the
    float32 operands of `@` / matmul / mm are rounded to TF32 as the tensor cores read them."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        if enabled:
            with _CpuTF32Matmuls():
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def round_to_tf32(x):
    """float32 x rounded to TF32's 10 mantissa bits, ties away from zero (cvt.rna.tf32.f32); inf, NaN kept."""
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


class _TF32Matmul(torch.autograd.Function):
    """a @ b of 2-D float32 CPU tensors with TF32 operands, forward and backward (as cuBLAS runs both)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return round_to_tf32(a) @ round_to_tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = round_to_tf32(g)
        return g @ round_to_tf32(b).T, round_to_tf32(a).T @ g


class _CpuTF32Matmuls(torch.overrides.TorchFunctionMode):
    _MATMULS = {torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MATMULS and not kwargs and len(args) == 2 and all(
                isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.device.type == "cpu" and a.dim() == 2
                for a in args):
            return _TF32Matmul.apply(*args)
        return func(*args, **kwargs)


# (kind, M, L, D): odd sizes, never multiples of the 64-row tiles; D from 1 to 2048 (several D chunks).
# The ids are what benchmarks/gpu_check.sh selects for the sanitizers: keep them.
CONTRASTIVE_CASES = [
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


def contrastive_inputs(kind, m, l, d, gen):
    """float64 (q, k, q_labels, k_labels, self_offset) on the CPU for the label layouts the op serves; q is a
    copy of keys [self_offset, self_offset + m) when self_offset >= 0, separate rows when it is -1."""
    q_labels, k_labels, offset = _labels_case(kind, m, l, gen)
    k = torch.randn(l, d, generator=gen, dtype=torch.float64)
    q = k[offset:offset + m].clone() if offset >= 0 else torch.randn(m, d, generator=gen, dtype=torch.float64)
    return q, k, q_labels, k_labels, offset


def _labels_case(kind, m, l, gen):
    if kind == "simclr":  # q = k = cat(z1, z2): one positive per row, self excluded
        labels = torch.arange(m // 2).repeat(2)
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
        return q_labels, torch.cat([q_labels, torch.full((l - m,), -1)]), -1
    raise ValueError(f"kind must be simclr, views, slice, supcon or bank, got {kind!r}")


def ntxent_op(*args):
    """The forward op's (loss, lse, npos); its fourth output (kept probabilities) is CPU-only."""
    return torch.ops.simclr_ext.ntxent(*args)[:3]


def reference_rows(q, k, q_labels, k_labels, t, offset):
    """simclr_reference's per-row losses, with the op's self_offset convention (-1: no self key)."""
    return ref.contrastive_loss(q, k, q_labels, k_labels, t, None if offset < 0 else offset, reduction="none")


def positive_counts(q_labels, k_labels, offset):
    pos = q_labels[:, None] == k_labels[None, :]
    if offset >= 0:
        rows = torch.arange(len(q_labels), device=q_labels.device)
        pos[rows, rows + offset] = False
    return pos.sum(1).int()


def assert_equal_to_rounding(ours, other, dtype, what):
    """Two computations of one quantity that differ only in their order of summation: within 2 ATOL[dtype] of
    each other, relative to the larger magnitude when it exceeds 1."""
    assert ours.shape == other.shape, f"{what}: shape {list(ours.shape)} != {list(other.shape)}"
    err = max_err(ours, other)
    scale = max(1.0, other.abs().max().item() if other.numel() else 1.0)
    assert err <= 2 * ATOL[dtype] * scale, f"{what}: differ by {err:.3e} > {2 * ATOL[dtype] * scale:.3e}"


def leaf(x, device="cpu", dtype=None):
    return x.detach().to(device, dtype).clone().requires_grad_(True)


def compare_with_reference(fused_fn, ref_fn, inputs, dtype, gen, what, device="cpu", tf32=False, layout=None,
                           magnitude=1.0, grad_magnitude=None):
    """Runs both losses on `device` copies of `inputs` (dtype), the reference also in float64 (its matmuls
    in TF32 when tf32, like the op's path); checks the loss and the gradients of (loss * grad_out).sum()
    with a random grad_out that is not 1. layout: None, or a function giving the fused side's copy of an
    input with other strides (a leaf holding the same values: non-contiguous views). magnitude,
    grad_magnitude (default: magnitude): see assert_matches_reference, for the loss and the gradients."""
    grad_magnitude = magnitude if grad_magnitude is None else grad_magnitude
    ours_in = [leaf(x, device) if layout is None else layout(leaf(x, device)).detach().requires_grad_(True)
               for x in inputs]
    same_in = [leaf(x, device) for x in inputs]
    ref64_in = [leaf(x.double(), device) for x in inputs]
    ours = fused_fn(*ours_in)
    with matmul_tf32(tf32):
        same = ref_fn(*same_in)
    ref64 = ref_fn(*ref64_in)
    grad_out = (torch.rand(ours.shape, generator=gen, dtype=torch.float64) + 0.5).to(device)
    assert ours.device.type == device
    assert_matches_reference(ours, same, ref64, dtype, f"{what} loss", magnitude)
    for name, o, s, r in zip("abcdef", ours_in, same_in, ref64_in):
        (g_o,) = torch.autograd.grad((ours * grad_out.to(ours.dtype)).sum(), o, retain_graph=True)
        with matmul_tf32(tf32):
            (g_s,) = torch.autograd.grad((same * grad_out.to(same.dtype)).sum(), s, retain_graph=True)
        (g_r,) = torch.autograd.grad((ref64 * grad_out).sum(), r, retain_graph=True)
        assert g_o.dtype == o.dtype and g_o.shape == o.shape and g_o.device == o.device
        assert_matches_reference(g_o, g_s, g_r, dtype, f"{what} grad of input {name}", grad_magnitude)


# The augmentation op's tolerances (tests/test_augment.py's docstring explains them).
AUGMENT_F32_MAX = 5e-5
AUGMENT_F32_MEAN = 2e-6


def assert_augment_close_to_reference(out, ref, scale=1.0):
    """out: the op's view (any dtype); ref: float64 reference; scale: 1 / min(std) when normalized."""
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    err = (out.double().cpu() - ref).abs()
    max_tol, mean_tol = AUGMENT_F32_MAX * scale, AUGMENT_F32_MEAN * scale
    if out.dtype != torch.float32:
        plain = (ref.to(out.dtype).double() - ref).abs()
        max_tol += 2 * plain.max().item()
        mean_tol += 2 * plain.mean().item()
    assert err.max().item() <= max_tol, f"max error {err.max().item():.3g} > {max_tol:.3g}"
    assert err.mean().item() <= mean_tol, f"mean error {err.mean().item():.3g} > {mean_tol:.3g}"
