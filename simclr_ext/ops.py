"""Thin Python layer over torch.ops.simclr_ext.*: fake (meta) kernels for torch.compile and
autograd for the fused contrastive op, whose backward is its own op."""
import torch

from . import _C  # noqa: F401  (loads the shared library, which registers the ops)

_ops = torch.ops.simclr_ext

__all__ = ["ntxent_forward", "ntxent_backward", "tf32_enabled", "set_tf32"]

# TF32 tensor cores for float32 inputs on CUDA (the CPU kernels always compute in full fp32/fp64).
_ALLOW_TF32 = True


def set_tf32(enabled: bool) -> None:
    """Set whether the CUDA contrastive kernel may use TF32 tensor cores for float32 inputs.

    On by default (like cuDNN's convolutions); pass False for the exact full-fp32 path. A per-call
    `allow_tf32=` argument of the loss functions overrides this global default.
    """
    global _ALLOW_TF32
    _ALLOW_TF32 = bool(enabled)


def tf32_enabled() -> bool:
    """The current global default of `set_tf32`."""
    return _ALLOW_TF32


def ntxent_forward(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32):
    """Per-row losses, log-sum-exps and positive counts of the contrastive op (see csrc/ntxent/ntxent.h)."""
    return _ops.ntxent.default(q, k, q_labels, k_labels, float(temperature), int(self_offset), bool(allow_tf32))


def ntxent_backward(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32):
    return _ops._ntxent_backward.default(grad_loss, q, k, q_labels, k_labels, lse, npos,
                                          float(temperature), int(self_offset), bool(allow_tf32))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("simclr_ext::ntxent")
def _ntxent_fake(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32):
    m = q.shape[0]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((m,), dtype=acc), q.new_empty((m,), dtype=acc), q.new_empty((m,), dtype=torch.int32))


@torch.library.register_fake("simclr_ext::_ntxent_backward")
def _ntxent_backward_fake(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, q_labels, k_labels, temperature, self_offset, allow_tf32 = inputs
    _, lse, npos = output
    ctx.save_for_backward(q, k, q_labels, k_labels, lse, npos)
    ctx.temperature = temperature
    ctx.self_offset = self_offset
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, grad_loss, grad_lse, grad_npos):
    q, k, q_labels, k_labels, lse, npos = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    grad_q, grad_k = _ops._ntxent_backward.default(
        grad_loss, q, k, q_labels, k_labels, lse, npos, ctx.temperature, ctx.self_offset, ctx.allow_tf32)
    return (grad_q if ctx.needs_input_grad[0] else None, grad_k if ctx.needs_input_grad[1] else None,
            None, None, None, None, None)


torch.library.register_autograd("simclr_ext::ntxent", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, grad_q, grad_k):
    raise RuntimeError("simclr_ext's fused contrastive loss does not support double backward "
                       "(create_graph=True through its gradient); use simclr_reference for higher-order gradients")


torch.library.register_autograd("simclr_ext::_ntxent_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
