"""The "cuda-emu" device of the test contract (parity.DEVICES): the CUDA kernels' unmodified device code run
on the CPU by the SIMT emulation (csrc/common/simt_host.h), through the GPU's own host orchestration, built
as the test-only extension simclr_ext_emu (tests/cuda_emu/build.py). Its tensors live on the CPU; while a
cuda-emu test runs (conftest.py's autouse fixture), simclr_ext's Python layer calls the emulated ops in place
of the CPU ones, so the public functions (nt_xent, clip_loss, SimCLRAugment, ...) run the CUDA kernels."""
import contextlib

import torch
from cuda_emu import build as _build

import simclr_ext.ops

_emu_ops = None

# The ops simclr_ext.ops reaches through its module attribute `_ops` that the emulation provides.
EMULATED_OPS = ("ntxent", "_ntxent_backward", "augment", "_ntxent_path_counts", "_ntxent_pass_counts",
                "_ntxent_reset_path_counts")


class EmulatedDevice(str):
    """The device parameter of a cuda-emu test: compares and converts as "cpu" (where its tensors live),
    shows as cuda-emu in test ids."""

    emulated = True

    def __repr__(self):
        return "cuda-emu"


CUDA_EMU = EmulatedDevice("cpu")


def is_emulated(device):
    return getattr(device, "emulated", False)


def ops():
    """torch.ops.simclr_ext_emu, built and loaded on first use, with simclr_ext's fake kernels (those of CUDA:
    no kept probabilities) and its refusal of a double backward."""
    global _emu_ops
    if _emu_ops is None:
        emu = _build.load()
        torch.library.register_fake("simclr_ext_emu::ntxent")(_ntxent_fake_cuda)
        torch.library.register_fake("simclr_ext_emu::_ntxent_backward")(simclr_ext.ops._ntxent_backward_fake)
        torch.library.register_fake("simclr_ext_emu::augment")(simclr_ext.ops._augment_fake)
        torch.library.register_autograd("simclr_ext_emu::_ntxent_backward", simclr_ext.ops._no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)
        _emu_ops = emu
    return _emu_ops


def _ntxent_fake_cuda(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs=False,
                      exclude_positives=False, positive_weight=None, two_way=False):
    """CUDA ignores keep_probs: its fourth output is always empty."""
    return simclr_ext.ops._ntxent_fake(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, False,
                                       exclude_positives, positive_weight, two_way)


class _Routed:
    """simclr_ext.ops' view of torch.ops while routed: the emulated ops, the rest of simclr_ext's."""

    def __init__(self, real, emu):
        self._real, self._emu = real, emu

    def __getattr__(self, name):
        return getattr(self._emu if name in EMULATED_OPS else self._real, name)


@contextlib.contextmanager
def routed():
    """Inside this block simclr_ext's ops are the emulated CUDA kernels, for simclr_ext's Python layer and for
    torch.ops.simclr_ext.* alike."""
    real = torch.ops.simclr_ext
    view = _Routed(real, ops())
    prev = simclr_ext.ops._ops
    simclr_ext.ops._ops = view
    torch.ops.simclr_ext = view
    try:
        yield
    finally:
        simclr_ext.ops._ops = prev
        torch.ops.simclr_ext = real


def set_device(sm_count, smem_optin=232448):
    """The emulated GPU's SM count (which decides the split plans) and shared-memory opt-in limit."""
    ops().set_emulated_device(sm_count, smem_optin)
