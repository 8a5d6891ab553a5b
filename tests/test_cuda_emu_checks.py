"""The CUDA kernels under ThreadSanitizer (`make test-tsan`, marked tsan: `make test` leaves them out):
tests/cuda_emu/kernel_check.cpp runs both ops' kernels through the SIMT emulation in a program TSan fully
instruments, and must come out race-free and right. Two altered copies of the kernels show that the checks
can fail: one __syncthreads removed is reported as a data race, and an edge tile streamed without its
bounds/self mask fails parity against the float64 reference."""
import os
import re
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CHECK = os.path.join(ROOT, "tests", "cuda_emu", "kernel_check.cpp")
KERNELS = os.path.join("ntxent", "ntxent_cuda_kernels.cuh")

pytestmark = pytest.mark.tsan


def _compile(out, *, tsan, overrides=None):
    """Builds kernel_check; `overrides` ({relative path: text}) shadow files of csrc/ with altered copies."""
    includes = []
    if overrides:
        shadow = os.path.join(os.path.dirname(out), "shadow")
        for rel, text in overrides.items():
            os.makedirs(os.path.join(shadow, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(shadow, rel), "w") as f:
                f.write(text)
        includes.append(f"-I{shadow}")
    cmd = [shutil.which("g++") or "g++", "-std=c++20", "-O1", "-g", "-pthread", "-fno-strict-aliasing",
           "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-Werror",
           "-DSIMCLR_EXT_CUDA_EMU", *includes, f"-I{CSRC}"]
    cmd += [f"-isystem{p}" for p in include_paths()]
    if tsan:
        cmd.append("-fsanitize=thread")
    subprocess.run(cmd + [CHECK, "-o", out], check=True, capture_output=True, text=True)
    return out


def _run(binary, *args):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1")
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=600)


def _kernels():
    with open(os.path.join(CSRC, KERNELS)) as f:
        return f.read()


def test_kernels_are_race_free_and_right_under_tsan(tmp_path):
    res = _run(_compile(str(tmp_path / "check"), tsan=True))
    assert "ThreadSanitizer" not in res.stderr, res.stderr[-4000:]
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert res.stdout.count(" ok\n") == 6, res.stdout


def test_a_removed_barrier_is_reported_as_a_race(tmp_path):
    """The barrier between the tile copies into shared memory and the products that read them (SIMT path)."""
    text = _kernels()
    barrier = "      if (c == 0) extra_loads();\n      __syncthreads();\n      for (int64_t k = 0; k < width; ++k) {"
    assert text.count(barrier) == 1, "the barrier this test removes moved: update the test"
    altered = text.replace(barrier, barrier.replace("      __syncthreads();\n", ""))
    res = _run(_compile(str(tmp_path / "check"), tsan=True, overrides={KERNELS: altered}), "first")
    assert res.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in res.stderr
    assert re.search(r"ntxent_cuda_kernels\.cuh:\d+", res.stderr), res.stderr[-3000:]


def test_an_unmasked_edge_tile_fails_parity(tmp_path):
    """The forward streams its last and diagonal key tiles without the bounds / self tests: the padding keys
    (zero rows) and each row's own key enter its denominator."""
    text = _kernels()
    mask = "const bool masked = tile_needs_mask(row0, col0, l, self_offset, true);"
    assert text.count(mask) == 1, "the mask this test removes moved: update the test"
    altered = text.replace(mask, "const bool masked = false;")
    res = _run(_compile(str(tmp_path / "check"), tsan=False, overrides={KERNELS: altered}), "first")
    assert res.returncode == 1, res.stdout + res.stderr[-2000:]
    assert "PARITY FAILURE" in res.stdout
