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


# ---------------------------------------------------------------------------------------------------
# Fused augmentation (simclr_ext/augment.py builds the arguments; csrc/augment/ has the kernels)


def augment_op(src, offsets, shapes, params, channels, src_channels_last, out_h, out_w, blur_kernel,
               solarize_threshold, mean, std, out_dtype, out_channels_last):
    """The raw op: packed images -> (B, channels, out_h, out_w) views (see csrc/ops.cpp for the schema)."""
    return _ops.augment.default(src, offsets, shapes, params, int(channels), bool(src_channels_last), int(out_h),
                                int(out_w), int(blur_kernel), float(solarize_threshold), list(mean), list(std),
                                out_dtype, bool(out_channels_last))


@torch.library.register_fake("simclr_ext::augment")
def _augment_fake(src, offsets, shapes, params, channels, src_channels_last, out_h, out_w, blur_kernel,
                  solarize_threshold, mean, std, out_dtype, out_channels_last):
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return torch.empty((offsets.shape[0], channels, out_h, out_w), dtype=out_dtype, device=src.device,
                       memory_format=fmt)
