"""The CPU kernels' SIMD clones (csrc/common/simd.h), each forced through SIMCLR_EXT_CPU_ISA in a fresh
process (the variable is read once): every clone this CPU runs matches the float64 oracle (NT-Xent loss and
gradients, symmetric and general cases, with the tolerance rule of tests/parity.py), and the augmentation,
which promises the same operations in the same order whatever the ISA, gives bit-identical views in every
clone. The baseline clone is the code a non-x86 machine (aarch64) runs; test_portable_build checks that the
kernels also compile with the x86 clones left out, as they are there."""
import os
import subprocess
import sys

import pytest
import torch
from parity import assert_matches_reference

import simclr_ext
import simclr_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONES = ("baseline", "avx2", "avx512")
RUNNABLE = CLONES[:CLONES.index(simclr_ext.info()["cpu_isa_best"]) + 1]

# The child: the same fresh random inputs in every clone (seeded), results saved for the parent to compare.
CHILD = r"""
import sys, torch, simclr_ext
torch.set_num_threads(2)
g = torch.Generator().manual_seed(int(sys.argv[2]))
# Odd sizes: several row blocks and key tiles, none full (the tile loops' edges).
z1 = torch.randn(157, 37, generator=g, dtype=torch.float64).float().requires_grad_()
z2 = torch.randn(157, 37, generator=g, dtype=torch.float64).float().requires_grad_()
loss = simclr_ext.nt_xent(z1, z2, 0.3)
gz1, gz2 = torch.autograd.grad(loss, [z1, z2])
q = torch.randn(131, 19, generator=g).requires_grad_()
k = torch.randn(301, 19, generator=g).requires_grad_()
ql = torch.randint(0, 7, (131,), generator=g)
kl = torch.randint(0, 7, (301,), generator=g)
general = simclr_ext.contrastive_loss(q, k, ql, kl, temperature=0.2)
gq, gk = torch.autograd.grad(general, [q, k])
images = torch.randint(0, 256, (6, 3, 67, 53), generator=g, dtype=torch.uint8)
aug = simclr_ext.SimCLRAugment(size=45, jitter_p=1.0, grayscale_p=0.3, blur_p=0.7, solarize_p=0.3)
views = torch.cat(aug(images, generator=torch.Generator().manual_seed(5)))
torch.save({"isa": simclr_ext.info()["cpu_isa"], "z": (z1.detach(), z2.detach()), "loss": loss.detach(),
            "grads": (gz1, gz2), "general_in": (q.detach(), k.detach(), ql, kl), "general": general.detach(),
            "general_grads": (gq, gk), "views": views}, sys.argv[1])
"""


def run_child(isa, *args, code=CHILD):
    env = dict(os.environ, SIMCLR_EXT_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def clone_results(tmp_path_factory):
    """{clone: the child's results}, one fresh process per clone this CPU runs, on the same random inputs."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    out = {}
    for isa in RUNNABLE:
        path = tmp_path_factory.mktemp(isa) / "out.pt"
        done = run_child(isa, path, seed)
        assert done.returncode == 0, f"SIMCLR_EXT_CPU_ISA={isa}: {done.stderr[-3000:]}"
        out[isa] = torch.load(path)
    return out


def _oracle_grads(fn, inputs, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("isa", RUNNABLE)
def test_each_clone_matches_the_float64_oracle(clone_results, isa):
    r = clone_results[isa]
    assert r["isa"] == isa  # the clone asked for is the one that ran
    nt = lambda a, b: ref.nt_xent(a, b, 0.3)  # noqa: E731
    loss32, grads32 = _oracle_grads(nt, r["z"], torch.float32)
    loss64, grads64 = _oracle_grads(nt, r["z"], torch.float64)
    assert_matches_reference(r["loss"], loss32, loss64, torch.float32, f"{isa} nt_xent loss")
    for i in range(2):
        assert_matches_reference(r["grads"][i], grads32[i], grads64[i], torch.float32, f"{isa} nt_xent grad z{i + 1}")
    q, k, ql, kl = r["general_in"]
    general = lambda a, b: ref.contrastive_loss(a, b, ql, kl, temperature=0.2)  # noqa: E731
    loss32, grads32 = _oracle_grads(general, (q, k), torch.float32)
    loss64, grads64 = _oracle_grads(general, (q, k), torch.float64)
    assert_matches_reference(r["general"], loss32, loss64, torch.float32, f"{isa} contrastive loss")
    for name, ours, g32, g64 in zip("qk", r["general_grads"], grads32, grads64):
        assert_matches_reference(ours, g32, g64, torch.float32, f"{isa} contrastive grad {name}")


def test_augmentation_is_identical_in_every_clone(clone_results):
    views = {isa: r["views"] for isa, r in clone_results.items()}
    first = views[RUNNABLE[0]]
    assert torch.isfinite(first).all() and first.std() > 0.1
    for isa, v in views.items():
        assert torch.equal(v, first), f"{isa} differs from {RUNNABLE[0]}: max {(v - first).abs().max().item():.3g}"


def test_unknown_or_unsupported_clone_is_a_clear_error():
    code = "import simclr_ext; print(simclr_ext.info()['cpu_isa'])"
    bad = run_child("avx3", code=code)
    assert bad.returncode != 0 and "SIMCLR_EXT_CPU_ISA must be avx512, avx2 or baseline" in bad.stderr
    assert "'avx3'" in bad.stderr
    for isa in CLONES[len(RUNNABLE):]:  # above what this CPU runs (none on an AVX-512 machine)
        above = run_child(isa, code=code)
        assert above.returncode != 0 and f"runs at most the {RUNNABLE[-1]} clone" in above.stderr
    unset = run_child("", code=code)
    assert unset.returncode == 0 and unset.stdout.split()[-1] == RUNNABLE[-1]


def test_portable_build(tmp_path):
    """The CPU kernels compile, warnings as errors, with the x86 clones and intrinsics left out
    (SIMCLR_EXT_PORTABLE_ONLY: the preprocessor branches a non-x86 compiler takes, simd_dispatch a plain call)."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or "c++"
    sources = [os.path.join(ROOT, "csrc", p) for p in ("common/simd.cpp", "augment/augment_cpu.cpp",
                                                       "ntxent/ntxent_cpu.cpp")]
    # C++20 (what recent torch headers need, older ones accept); torch's headers as system headers: the
    # warnings checked are our code's.
    flags = ["-std=c++20", "-fsyntax-only", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
             "-DSIMCLR_EXT_PORTABLE_ONLY"]
    incs = [f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-isystem{p}" for p in include_paths()]
    for src in sources:
        done = subprocess.run([cxx, *flags, *incs, src], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, f"{os.path.basename(src)} without the x86 clones:\n{done.stderr[-3000:]}"
