"""Tolerances of the parity tests, written once: the fused op's error against a float64 reference may be
at most ~2x the error of the reference itself computed in the same dtype (flash-attention's rule), plus
a small absolute floor for entries whose reference error happens to be ~0."""
import pytest
import torch

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(ours, ref_same_dtype, ref64, dtype, what):
    """ours vs the float64 reference, allowed 2x the error the reference makes in `dtype`."""
    assert ours.shape == ref64.shape, f"{what}: shape {list(ours.shape)} != {list(ref64.shape)}"
    err = max_err(ours, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    bound = 2 * ref_err + ATOL[dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (reference's own {dtype} error {ref_err:.3e})"


# (dtype, allow_tf32): every precision path of the CUDA kernels. float32 runs both the exact FFMA path and TF32.
PRECISION_PATHS = [
    pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="tf32"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16"),
]
