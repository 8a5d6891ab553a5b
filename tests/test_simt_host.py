"""The CUDA emulation itself (csrc/common/simt_host.h), checked by tests/cpp/simt_host_test.cpp with kernels of
its own: barriers and shared memory, the three divergent-barrier failures (a thread returned, another call
site, a block / warp barrier deadlock), shuffles, partial masks refused, shared memory poisoned in every
block, the shared-memory opt-in, wmma products against float64, TF32 rounding and the 16-bit conversions
(every finite half round-trips; ties to even)."""
from host_cpp import build_and_run


def test_simt_emulation(tmp_path):
    build_and_run("simt_host_test", tmp_path,
                  extra=("-std=c++20", "-pthread", "-fno-strict-aliasing", "-DSIMCLR_EXT_CUDA_EMU"))
