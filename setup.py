"""Build simclr_ext._C.

SIMCLR_EXT_CUDA=auto (default) builds the CUDA kernels when a CUDA toolkit is found, 1 forces them
(failing clearly when none is found), 0 builds the CPU kernels only. Every csrc/**/*.cpp is compiled;
csrc/**/*.cu only in the CUDA build. Without a visible GPU set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0").
"""
import ast
import glob
import os
import sys

from setuptools import find_packages, setup

# The C++ standard is left to torch.utils.cpp_extension: torch 2.14 headers need C++20, older ones C++17.
# torch.utils.cpp_extension resolves CUDA_HOME at import time; the /usr/local/bin/nvcc wrapper on
# these machines would make it guess /usr/local, which compiles but cannot link -lcudart.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    """The version, written once in simclr_ext/_version.py; parsed, not imported: importing the package
    would load the extension this script is about to build."""
    path = os.path.join(ROOT, "simclr_ext", "_version.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    sys.exit(f"{path} must assign __version__ = \"X.Y.Z\"")


def _want_cuda():
    mode = os.environ.get("SIMCLR_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"SIMCLR_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if CUDA_HOME is None:
        if mode == "1":
            sys.exit("SIMCLR_EXT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False
    return True


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _cuda_archs():
    """The targets of the CUDA build, e.g. "sm_80+sm_90" (no spaces or quotes: it goes through a shell)."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except Exception as exc:  # no GPU and no TORCH_CUDA_ARCH_LIST: torch cannot pick an arch
        sys.exit(f"cannot resolve the CUDA architectures ({exc}); set TORCH_CUDA_ARCH_LIST, e.g. \"8.0;9.0\"")
    archs = sorted({f.split("code=")[-1].strip("[]").split(",")[0] for f in flags if "code=" in f})
    return "+".join(archs)


def _extension():
    use_cuda = _want_cuda()
    debug = os.environ.get("SIMCLR_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fno-math-errno/-fno-trapping-math (as torch itself builds) let the CPU kernels' loops vectorize;
    # unlike -ffast-math they keep IEEE results. -ffp-contract=off: the backward recomputes logits
    # with the forward's exact roundings (an FMA would fuse c * (1/t) - lse and break exact cancellation).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("SIMCLR_EXT_WERROR", "0") == "1":
        cxx.append("-Werror")
    sources = _sources("*.cpp")
    kwargs = dict(
        name="simclr_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda:
        sources += _sources("*.cu")
        # nvcc rejects -g0 ("Unknown option"): it goes to the host compiler through -Xcompiler.
        nvcc_opt = opt if debug else ["-O3", "-Xcompiler", "-g0"]
        nvcc = nvcc_opt + ["--expt-relaxed-constexpr", "-lineinfo" if not debug else "-G",
                      "-Xcompiler", "-Wall", "--threads", "2"]
        if os.environ.get("SIMCLR_EXT_WERROR", "0") == "1":
            nvcc += ["-Werror", "all-warnings"]
        if os.environ.get("SIMCLR_EXT_PTXAS_VERBOSE", "0") == "1":
            nvcc += ["-Xptxas", "-v"]
        defines = ["-DSIMCLR_EXT_WITH_CUDA", f"-DSIMCLR_EXT_CUDA_ARCHS={_cuda_archs()}"]
        ext = CUDAExtension(extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines}, **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    arch = _cuda_archs() if use_cuda else "-"
    print(f"simclr_ext build: {'CUDA' if use_cuda else 'CPU-only'} | CUDA_HOME={CUDA_HOME} | "
          f"TORCH_CUDA_ARCH_LIST={arch} | {len(sources)} sources | {'debug' if debug else 'release'}",
          file=sys.stderr)
    return ext


setup(
    name="simclr_ext",
    version=_version(),
    description="Fused C++/CUDA NT-Xent loss and batched augmentations for SimCLR in PyTorch",
    long_description=(open(os.path.join(ROOT, "README.md")).read()
                      if os.path.exists(os.path.join(ROOT, "README.md")) else ""),
    long_description_content_type="text/markdown",
    packages=(find_packages(include=["simclr_ext", "simclr_ext.*"])
              + find_packages("python", include=["simclr_reference", "simclr_reference.*"])),
    package_dir={"simclr_ext": "simclr_ext", "simclr_reference": "python/simclr_reference"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy>=1.22"],
    extras_require={
        "train": ["torchvision>=0.19", "scikit-learn>=1.0", "tqdm>=4.0", "matplotlib>=3.5"],
        "test": ["pytest>=7", "scikit-learn>=1.0", "torchvision>=0.19", "expecttest", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["simclr-ext=simclr_ext.recipe.cli:main"]},
    zip_safe=False,
)
