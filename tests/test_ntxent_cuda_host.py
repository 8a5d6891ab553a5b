"""What of the CUDA kernels can be checked without a GPU: the tiling and launch plan shared through
csrc/ntxent/ntxent_cuda_plan.h (compiled here as plain C++ and checked exhaustively by tests/cpp/), and that a CUDA
build really registered the CUDA kernels."""
import pytest
import torch
from host_cpp import build_and_run

import simclr_ext


def test_tiling_plan_and_index_maps(tmp_path):
    """Builds tests/cpp/ntxent_cuda_plan_test.cpp against the kernels' headers (ntxent_cuda_plan.h, ntxent.h) and runs
    it: shared-memory layout (alignment for wmma, no overlaps, fits sm_80/sm_90), grids covering every padded row,
    D chunks adding up, lane maps covering each strip element once and bank-conflict free, online log-sum-exp merges,
    and the symmetric backward's per-pair gradient H = dS + dS^T (shared with the CPU kernel)."""
    build_and_run("ntxent_cuda_plan_test", tmp_path)


def test_cuda_build_registers_cuda_kernels():
    """A CUDA build must carry the CUDA kernels of both ops (a silent CPU-only fallback is a bug)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    compiled = simclr_ext.info()["cuda_compiled"]
    for op in ("simclr_ext::ntxent", "simclr_ext::_ntxent_backward"):
        assert has(op, "CPU"), f"{op} has no CPU kernel"
        assert has(op, "CUDA") == compiled, f"{op}: CUDA kernel registered={has(op, 'CUDA')}, cuda_compiled={compiled}"


@pytest.mark.skipif(not simclr_ext.info()["cuda_compiled"], reason="CPU-only build: no CUDA kernels to inspect")
def test_cuda_kernels_reject_bad_input_before_any_launch():
    """Argument checks run on the host before the device is touched, so they answer on a machine
    without a GPU too: CUDA-dispatched calls with a CPU tensor among the inputs fail with the shared
    messages of ntxent_checks.h, not with a CUDA error."""
    if torch.cuda.is_available():
        pytest.skip("checked with real CUDA tensors in test_ntxent_cuda_only.py")
    q = torch.randn(4, 3)
    labels = torch.zeros(4, dtype=torch.long)
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    fwd = torch.ops.simclr_ext.ntxent.default
    bwd = torch.ops.simclr_ext._ntxent_backward.default
    with pytest.raises(RuntimeError, match=r"q must be 2-D \(M, D\), got shape \[3\]"):
        fwd.redispatch(cuda, q[0], q, labels, labels, torch.tensor(0.1), 0, True)
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0, got -1"):
        fwd.redispatch(cuda, q, q, labels, labels, torch.tensor(-1.0), 0, True)
    with pytest.raises(RuntimeError, match="self_offset must be -1 or in"):
        fwd.redispatch(cuda, q, q, labels, labels, torch.tensor(0.1), 2, True)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor for the CUDA kernel"):
        fwd.redispatch(cuda, q, q, labels, labels, torch.tensor(0.1), 0, True)
    lse, npos = torch.zeros(4), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="npos must be int32"):
        bwd.redispatch(cuda, torch.ones(4), q, q, labels, labels, lse, npos.long(), torch.tensor(0.1), 0, True)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor for the CUDA kernel"):
        bwd.redispatch(cuda, torch.ones(4), q, q, labels, labels, lse, npos, torch.tensor(0.1), 0, True)
