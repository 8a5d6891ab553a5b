"""What this installation of simclr_ext was built with and runs on."""
import torch

from . import ops
from ._version import __version__


def _build_fields():
    fields = dict(item.split("=", 1) for item in torch.ops.simclr_ext._build_info().split(";"))
    archs = [a for a in fields["archs"].split("+") if a]
    return fields["cuda"] == "1", archs, fields["openmp"] == "1"


def _cpu_isa_fields():
    return dict(item.split("=", 1) for item in torch.ops.simclr_ext._cpu_isa_info().split(";"))


def info():
    """A dict describing the build and the runtime: version, torch, cuda_compiled, cuda_archs, threads, ...

    `cuda_compiled` says whether the CUDA kernels are in the binary (`pip install` builds them when a CUDA
    toolkit is present); `cuda_available` whether torch sees a GPU now. `cpu_isa` is the SIMD clone the CPU
    kernels run (avx512, avx2 or baseline: the best this CPU supports, `cpu_isa_best`, unless the environment
    variable SIMCLR_EXT_CPU_ISA, read once, asks for a lower one).
    """
    cuda_compiled, archs, openmp = _build_fields()
    isa = _cpu_isa_fields()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_compiled": cuda_compiled,
        "cuda_archs": archs,
        "cuda_available": torch.cuda.is_available(),
        "openmp": openmp,
        "threads": torch.get_num_threads(),
        "cpu_isa": isa["active"],
        "cpu_isa_best": isa["best"],
        "tf32": ops.tf32_enabled(),
    }
