"""Builds and loads the test-only extension of the emulated CUDA kernels (simclr_ext_emu): the unmodified
device code of csrc/*/..._cuda_kernels.cuh compiled by the C++ compiler against csrc/common/simt_host.h and
driven by the same host orchestration as the GPU build. torch.ops.simclr_ext_emu.{ntxent, _ntxent_backward,
augment} then take CPU tensors. Built incrementally under build/cuda_emu/ (`make test` builds it first, the
tests on the "cuda-emu" device load it); a normal `pip install` never compiles it."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "cuda_emu")

SOURCES = [
    os.path.join(HERE, "registration.cpp"),
    os.path.join(HERE, "ntxent_emu.cpp"),
    os.path.join(HERE, "augment_emu.cpp"),
    os.path.join(ROOT, "csrc", "ntxent", "ntxent_autograd.cpp"),
    os.path.join(ROOT, "csrc", "ntxent", "ntxent_paths.cpp"),
]

# As the main build (setup.py) but for the emulation: no OpenMP (the kernels' threads are the emulator's),
# -fno-strict-aliasing (the tile copies move T rows through uint4, as CUDA code does), no warnings for
# #pragma unroll. -ffp-contract=off as in every build: no fused multiply-adds the GPU code does not write.
CFLAGS = ["-O2", "-g0", "-fno-strict-aliasing", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
          "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
          "-DSIMCLR_EXT_CUDA_EMU", "-DSIMCLR_EXT_OP_NAMESPACE=simclr_ext_emu"]


def load(verbose=False):
    """Builds (if a source changed) and imports the extension; returns torch.ops.simclr_ext_emu."""
    import torch
    from torch.utils import cpp_extension

    import simclr_ext  # noqa: F401  (the emulated ops copy simclr_ext's schemas: it must be registered first)

    build_dir = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="simclr_ext_emu", sources=SOURCES, extra_cflags=CFLAGS,
                       extra_include_paths=[os.path.join(ROOT, "csrc"), HERE], build_directory=build_dir,
                       verbose=verbose)
    return torch.ops.simclr_ext_emu


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "python"))
    load(verbose=True)
    print("simclr_ext_emu built under build/cuda_emu")
