"""What of the CUDA augmentation can be checked without a GPU: its launch plan (csrc/augment/augment_cuda_plan.h)
and the per-device attribute cache (csrc/common/per_device_cache.h), compiled here as plain C++ and checked
by tests/cpp/, and that a CUDA build registered the CUDA kernel."""
import pytest
import torch
from host_cpp import build_and_run

import simclr_ext


def test_launch_plan(tmp_path):
    """Tilings cover every output pixel once; the blur's shared-memory layout holds every index the kernel
    uses; the tile search picks the largest tile that fits and refuses exactly when none does; the host's
    "does any sample blur" agrees with the kernel's decoding of the parameters (-0, NaN, denormals)."""
    build_and_run("augment_cuda_plan_test", tmp_path)


def test_per_device_cache(tmp_path):
    """One query per device under 8 racing threads, values kept apart per device, a failing query retried,
    device indices outside the count refused with the index in the message."""
    build_and_run("per_device_cache_test", tmp_path, extra=("-pthread",))


def test_cuda_build_registers_the_augment_kernel():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("simclr_ext::augment", "CPU")
    compiled = simclr_ext.info()["cuda_compiled"]
    assert has("simclr_ext::augment", "CUDA") == compiled, f"cuda_compiled={compiled}"


@pytest.mark.skipif(not simclr_ext.info()["cuda_compiled"], reason="CPU-only build: no CUDA kernel to call")
def test_cuda_kernel_rejects_bad_input_before_any_launch():
    """The checks run on the host before the device is touched, so they answer without a GPU too."""
    if torch.cuda.is_available():
        pytest.skip("checked with real CUDA tensors in test_augment.py")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    op = torch.ops.simclr_ext.augment.default
    src = torch.zeros(3 * 8 * 8, dtype=torch.uint8)
    offsets, shapes = torch.zeros(1, dtype=torch.long), torch.tensor([[8, 8]])
    params = torch.zeros(1, 19)
    with pytest.raises(RuntimeError, match="blur_kernel must be odd"):
        op.redispatch(cuda, src, offsets, shapes, params, 3, False, 8, 8, 4, 0.5, [], [], torch.float32, False)
    with pytest.raises(RuntimeError, match="crop box of sample 0"):
        op.redispatch(cuda, src, offsets, shapes, params, 3, False, 8, 8, 3, 0.5, [], [], torch.float32, False)
