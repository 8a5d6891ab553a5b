"""Thin Python layer over torch.ops.simclr_ext.*: fake (meta) kernels for torch.compile and
autograd for the fused contrastive op, whose backward is its own op."""
import torch

from . import _C  # noqa: F401  (loads the shared library, which registers the ops)

_ops = torch.ops.simclr_ext

# One name per op: the wrapper is named like its schema (simclr_ext::ntxent -> ntxent, simclr_ext::augment ->
# augment); the backward op is reached through autograd only.
__all__ = ["ntxent", "augment", "ntxent_path_counts", "ntxent_pass_counts", "reset_ntxent_path_counts",
           "tf32_enabled", "set_tf32", "resolve_tf32"]

# None: follow PyTorch's float32 matmul precision; True / False: simclr_ext's own override (set_tf32).
_TF32_OVERRIDE = None


# Dynamo cannot trace torch's precision getters (pybind functions): under torch.compile the decision is
# taken once, when the function is compiled, and baked into the graph.
@torch.compiler.assume_constant_result
def _torch_matmul_allows_tf32() -> bool:
    """Whether PyTorch's own float32 CUDA matmuls may use TF32 right now.

    torch >= 2.9 keeps the setting in `torch.backends.cuda.matmul.fp32_precision` ("tf32" | "ieee", or
    "none" to inherit `torch.backends.fp32_precision`); `torch.set_float32_matmul_precision` writes it too,
    and `torch.get_float32_matmul_precision()` raises once the new API has been used. Older torch only has
    the latter: "highest" is exact fp32, "high" and "medium" allow TF32.
    """
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def set_tf32(enabled) -> None:
    """Override PyTorch's precision policy for simclr_ext's CUDA contrastive kernel only.

    By default (`None`) the kernel follows PyTorch: float32 inputs use TF32 tensor cores exactly when
    `torch.get_float32_matmul_precision()` is "high" or "medium" (or `torch.backends.cuda.matmul.fp32_precision`
    is "tf32"), and the exact full-fp32 path under "highest", PyTorch's default. `set_tf32(True)` /
    `set_tf32(False)` force one path whatever PyTorch's setting; `set_tf32(None)` returns to following it.
    A per-call `allow_tf32=` of the loss functions overrides both. The CPU kernels are always exact.
    Under torch.compile the decision is read when the function is compiled (pass allow_tf32= explicitly
    to pin it).
    """
    global _TF32_OVERRIDE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None (follow torch's float32 matmul precision), "
                        f"got {enabled!r}")
    _TF32_OVERRIDE = enabled


def resolve_tf32(allow_tf32=None) -> bool:
    """The TF32 decision of one call: `allow_tf32` if given, else `set_tf32`'s override, else PyTorch's
    float32 matmul precision (see `set_tf32`)."""
    if allow_tf32 is not None:
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True, False or None, got {allow_tf32!r}")
        return allow_tf32
    if _TF32_OVERRIDE is not None:
        return _TF32_OVERRIDE
    return _torch_matmul_allows_tf32()


def tf32_enabled() -> bool:
    """Whether a call with allow_tf32=None uses TF32 for float32 CUDA inputs now (see `set_tf32`)."""
    return resolve_tf32(None)


# Below this many score-matrix entries (M * L), a CPU forward that will be differentiated keeps the
# softmax probabilities for the backward, which then multiplies them once instead of recomputing the
# score tiles and their exps (two GEMM passes in all instead of three). 2048 x 2048 (16 MiB of float32):
# measured on the CPU (1 thread, D = 128, benchmarks/results/ntxent_cpu_*.md), keeping is faster at
# 2N = 256 ... 2048 and no faster at 2N = 4096, where the recomputed path is within a few percent; beyond
# it the matrix would cost memory for nothing. Far below the memory rule (2N = 16384 never keeps).
_KEEP_PROBS_MAX_ELEMENTS = 2048 * 2048


def _keep_probs(q, k):
    return (q.device.type == "cpu" and q.shape[0] * k.shape[0] <= _KEEP_PROBS_MAX_ELEMENTS
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))


def _temperature_arg(temperature):
    """The op takes the temperature as a 0-d tensor (differentiable); a number becomes a float64 CPU scalar."""
    if isinstance(temperature, torch.Tensor):
        return temperature
    return torch.tensor(float(temperature), dtype=torch.float64)


def _weight_arg(positive_weight, q):
    return None if positive_weight is None else positive_weight.to(_acc_dtype(q.dtype)).contiguous()


def ntxent(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, exclude_positives=False,
           positive_weight=None, two_way=False, normalize=True, sigmoid=False, bias=None):
    """Per-row losses, log-sum-exps and positive counts of the contrastive op (see csrc/ntxent/ntxent.h).
    temperature: a number or a 0-d floating tensor (its gradient flows); exclude_positives: DCL;
    positive_weight: None or (M,) constant weights of the positive term (DCLW); two_way: CLIP, the key
    columns' losses over the queries follow the M query rows' (outputs (M + L,)); normalize=False: dot
    products of the rows as given instead of cosines; sigmoid: SigLIP's per-pair sigmoid loss with `bias`
    (None: 0; a number or a 0-d floating tensor, its gradient flows), whose second output is then the row's
    sum of sigmoids instead of a log-sum-exp."""
    keep = _keep_probs(q, k) and not two_way and not sigmoid
    loss, lse, npos, _ = _ops.ntxent.default(q, k, q_labels, k_labels, _temperature_arg(temperature),
                                             int(self_offset), bool(allow_tf32), keep, bool(exclude_positives),
                                             _weight_arg(positive_weight, q), bool(two_way), bool(normalize),
                                             bool(sigmoid), None if bias is None else _temperature_arg(bias))
    return loss, lse, npos


def ntxent_path_counts():
    """How many calls took each code path of the contrastive kernels since the last reset, as a dict
    {"cpu_forward_streamed": n, "cpu_backward_symmetric": n, ...} (csrc/ntxent/ntxent_paths.h). For tests
    and debugging: which backward a call ran (symmetric or general, recomputed or from kept probabilities)."""
    return _parse_counts(_ops._ntxent_path_counts.default())


def ntxent_pass_counts():
    """How many gradient products the contrastive backward ran since the last reset, per backend, as a dict
    {"cpu_dq": n, "cpu_dk": n, "cuda_dq": n, "cuda_dk": n} (csrc/ntxent/ntxent_paths.h): a backward
    with detached keys runs no dk product, one that needs neither grad_q nor the temperature's no dq."""
    return _parse_counts(_ops._ntxent_pass_counts.default())


def _parse_counts(text):
    counts = {}
    for item in text.split(";"):
        name, value = item.split("=")
        counts[name] = int(value)
    return counts


def reset_ntxent_path_counts():
    """Sets every counter of `ntxent_path_counts` and `ntxent_pass_counts` to 0."""
    _ops._ntxent_reset_path_counts.default()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The kernels' argument checks (csrc/ntxent/ntxent_checks.h: ranks, dtypes, devices, shapes, with the same
# messages), so that a torch.compile trace or a FakeTensorMode run rejects bad input before any kernel runs.
# Values (a temperature's sign) are only checked by the kernels: fake tensors have none.
def _check_labels_fake(labels, name, rows, q):
    torch._check(labels.dim() == 1 and labels.shape[0] == rows,
                 lambda: f"{name} must have shape [{rows}], got {list(labels.shape)}")
    torch._check(labels.dtype == torch.int64, lambda: f"{name} must be int64, got {labels.dtype}")
    torch._check(labels.device == q.device,
                 lambda: f"{name} must be on the device of q ({q.device}), got {labels.device}")


def _check_forward_fake(q, k, q_labels, k_labels, temperature, self_offset, positive_weight, two_way,
                        keep_probs=False, exclude_positives=False, sigmoid=False, bias=None):
    torch._check(q.dim() == 2, lambda: f"q must be 2-D (M, D), got shape {list(q.shape)}")
    torch._check(k.dim() == 2, lambda: f"k must be 2-D (L, D), got shape {list(k.shape)}")
    torch._check(q.dtype in _FLOAT_DTYPES, lambda: f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    torch._check(k.dtype == q.dtype, lambda: f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    torch._check(k.device == q.device, lambda: f"k must be on the device of q ({q.device}), got {k.device}")
    torch._check(q.shape[1] == k.shape[1], lambda: f"q and k must have the same feature dimension D, got q "
                                                   f"{list(q.shape)} and k {list(k.shape)}")
    _check_labels_fake(q_labels, "q_labels", q.shape[0], q)
    _check_labels_fake(k_labels, "k_labels", k.shape[0], q)
    torch._check(temperature.dim() == 0,
                 lambda: f"temperature must be a 0-d tensor, got shape {list(temperature.shape)}")
    torch._check(temperature.dtype.is_floating_point,
                 lambda: f"temperature must be a floating tensor, got {temperature.dtype}")
    torch._check(temperature.device.type == "cpu" or temperature.device == q.device,
                 lambda: f"temperature must be on the CPU or on the device of q ({q.device}), got {temperature.device}")
    torch._check(self_offset == -1 or (self_offset >= 0 and self_offset + q.shape[0] <= k.shape[0]),
                 lambda: f"self_offset must be -1 or in [0, L - M], got {self_offset}")
    if positive_weight is not None:
        acc = _acc_dtype(q.dtype)
        torch._check(positive_weight.shape == (q.shape[0],) and positive_weight.dtype == acc
                     and positive_weight.device == q.device,
                     lambda: f"positive_weight must be a {acc} tensor of shape [{q.shape[0]}] on {q.device}, got "
                             f"{positive_weight.dtype} {list(positive_weight.shape)} on {positive_weight.device}")
    if two_way:
        torch._check(self_offset == -1,
                     lambda: f"two_way needs self_offset = -1 (no query is one of the keys), got {self_offset}")
        torch._check(not keep_probs, lambda: "two_way does not keep probabilities: pass keep_probs=False")
        torch._check(not exclude_positives and positive_weight is None,
                     lambda: "two_way does not take exclude_positives or positive_weight (DCL / DCLW terms)")
    _check_sigmoid_fake(q, self_offset, keep_probs, exclude_positives, positive_weight, two_way, sigmoid, bias)


def _check_sigmoid_fake(q, self_offset, keep_probs, exclude_positives, positive_weight, two_way, sigmoid, bias):
    if not sigmoid:
        torch._check(bias is None, lambda: "bias is the sigmoid mode's (sigmoid=True); pass bias=None")
        return
    torch._check(self_offset == -1, lambda: f"the sigmoid mode needs self_offset = -1 (no query is one of the keys), "
                                            f"got {self_offset}")
    torch._check(not keep_probs, lambda: "the sigmoid mode does not keep probabilities: pass keep_probs=False")
    torch._check(not exclude_positives and positive_weight is None and not two_way,
                 lambda: "the sigmoid mode does not take exclude_positives, positive_weight or two_way")
    if bias is not None:
        torch._check(bias.dim() == 0 and bias.dtype.is_floating_point,
                     lambda: f"bias must be a 0-d floating tensor, got {bias.dtype} of shape {list(bias.shape)}")
        torch._check(bias.device.type == "cpu" or bias.device == q.device,
                     lambda: f"bias must be on the CPU or on the device of q ({q.device}), got {bias.device}")


def _check_backward_fake(grad_loss, q, k, lse, npos, two_way):
    rows = q.shape[0] + k.shape[0] if two_way else q.shape[0]
    acc = _acc_dtype(q.dtype)
    torch._check(grad_loss.dim() == 1 and grad_loss.shape[0] == rows,
                 lambda: f"grad_loss must have shape [{rows}], got {list(grad_loss.shape)}")
    torch._check(grad_loss.dtype.is_floating_point, lambda: f"grad_loss must be floating, got {grad_loss.dtype}")
    torch._check(lse.dim() == 1 and lse.shape[0] == rows and lse.dtype == acc,
                 lambda: f"lse must be {acc} of shape [{rows}], got {lse.dtype} {list(lse.shape)}")
    torch._check(npos.dim() == 1 and npos.shape[0] == rows and npos.dtype == torch.int32,
                 lambda: f"npos must be int32 of shape [{rows}], got {npos.dtype} {list(npos.shape)}")
    for t in (grad_loss, lse, npos):
        torch._check(t.device == q.device,
                     lambda t=t: f"grad_loss, lse and npos must be on the device of q ({q.device}), got {t.device}")


@torch.library.register_fake("simclr_ext::ntxent")
def _ntxent_fake(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs=False,
                 exclude_positives=False, positive_weight=None, two_way=False, normalize=True, sigmoid=False,
                 bias=None):
    _check_forward_fake(q, k, q_labels, k_labels, temperature, self_offset, positive_weight, two_way, keep_probs,
                        exclude_positives, sigmoid, bias)
    m = q.shape[0] + k.shape[0] if two_way else q.shape[0]
    acc = _acc_dtype(q.dtype)
    probs_shape = (q.shape[0], k.shape[0]) if keep_probs and q.device.type == "cpu" else (0, 0)
    return (q.new_empty((m,), dtype=acc), q.new_empty((m,), dtype=acc), q.new_empty((m,), dtype=torch.int32),
            q.new_empty(probs_shape, dtype=acc))


# output_mask: an output left out is None (an undefined tensor from the kernels), as with ATen's own
# output_mask backwards (convolution_backward, native_layer_norm_backward).
@torch.library.register_fake("simclr_ext::_ntxent_backward")
def _ntxent_backward_fake(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32,
                          probs=None, exclude_positives=False, positive_weight=None, two_way=False,
                          output_mask=(True, True, True), normalize=True, sigmoid=False, bias=None):
    _check_forward_fake(q, k, q_labels, k_labels, temperature, self_offset, positive_weight, two_way,
                        probs is not None and probs.numel() > 0, exclude_positives, sigmoid, bias)
    _check_backward_fake(grad_loss, q, k, lse, npos, two_way)
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format) if output_mask[0] else None
    grad_k = torch.empty_like(k, memory_format=torch.contiguous_format) if output_mask[1] else None
    grad_t = q.new_empty((), dtype=_acc_dtype(q.dtype)) if output_mask[2] else None
    return grad_q, grad_k, grad_t


# Autograd of simclr_ext::ntxent is registered in C++ (csrc/ntxent/ntxent_autograd.cpp): a Python
# registration cost tens of microseconds per step, a large share of a small batch's loss on the CPU.


def _no_double_backward(ctx, grad_q, grad_k, grad_temperature):
    raise RuntimeError("simclr_ext's fused contrastive loss does not support double backward "
                       "(create_graph=True through its gradient); use simclr_reference for higher-order gradients")


torch.library.register_autograd("simclr_ext::_ntxent_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------------
# Fused augmentation (simclr_ext/augment.py builds the arguments; csrc/augment/ has the kernels)


def augment(src, offsets, shapes, params, channels, src_channels_last, out_h, out_w, blur_kernel,
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
