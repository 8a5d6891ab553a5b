"""Property-based fuzzing (hypothesis) of both ops and every loss module on the CPU against the float64 oracle
(simclr_reference), with the tolerance rule of tests/parity.py: shapes 1 and primes, D from 1 to 1024,
non-contiguous views, every dtype, labels with no or only positives, extreme temperatures and logit scales,
NaN/inf inputs (a NaN where the oracle has one, never a finite wrong value, never a crash).

Profiles (SIMCLR_EXT_FUZZ): "ci" (default) is derandomized, a fixed example count bounded to well under a
minute in all; "long" draws fresh random examples, many more of them (a local fuzzing session):
    SIMCLR_EXT_FUZZ=long python -m pytest -q tests/test_fuzz.py
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from parity import assert_augment_close_to_reference, compare_with_reference

import simclr_ext
import simclr_reference as ref

PROFILE_ENV = "SIMCLR_EXT_FUZZ"
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PROFILE = os.environ.get(PROFILE_ENV, "ci")
if _PROFILE not in ("ci", "long"):
    raise pytest.UsageError(f"{PROFILE_ENV} must be 'ci' or 'long', got {_PROFILE!r}")
FUZZ = settings(settings.get_profile(_PROFILE))


def fuzz(ci_examples):
    """The profile's settings; the CI profile runs `ci_examples` examples of this test (its share of the
    minute), the long one its own count."""
    return settings(FUZZ, max_examples=ci_examples) if _PROFILE == "ci" else FUZZ

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
LAYOUTS = ["contiguous", "transposed", "column-step", "row-step", "offset"]

# 1, primes and a few round numbers, or anything in range (shrinks towards small shapes).
ROWS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 37]), st.integers(1, 40))
DIMS = st.one_of(st.sampled_from([1, 2, 3, 127, 509, 1021, 1024]), st.integers(1, 1024))
# 1e-3 ... 1e3, log-uniform: scores from +-1000 (a one-hot softmax) to +-0.001 (a flat one).
TEMPERATURES = st.floats(-3.0, 3.0).map(lambda e: 10.0 ** e)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _restride(layout):
    """The fused side's copy of a 2-D input in `layout`: same values, other strides (never contiguous but for
    "contiguous"), so the ops see every kind of view a model's output can be."""
    def apply(x):
        if x.dim() != 2:  # a tensor temperature or logit scale
            return x.detach().clone()
        rows, d = x.shape
        if layout == "transposed":
            return x.detach().t().contiguous().t()
        if layout == "column-step":
            wide = torch.zeros(rows, 2 * d, dtype=x.dtype)
            wide[:, ::2] = x.detach()
            return wide[:, ::2]
        if layout == "row-step":
            tall = torch.zeros(2 * rows, d, dtype=x.dtype)
            tall[::2] = x.detach()
            return tall[::2]
        if layout == "offset":  # a view starting inside its storage
            big = torch.zeros(rows + 1, d + 3, dtype=x.dtype)
            big[1:, 3:] = x.detach()
            return big[1:, 3:]
        return x.detach().clone()
    return apply


def _magnitudes(temperature, *inputs):
    """The rounding floors (see parity.assert_matches_reference) of the loss and of its gradients. The scores
    cos / t carry a rounding error of ~eps / t; the softmax turns it into a relative error of its
    probabilities, which the gradient multiplies by 1 / t again (eps / t^2), and normalizing a row x by
    1 / |x| (large where a D = 1 gradient cancels to ~0 at a tiny |x|)."""
    norms = [x.double().reshape(-1, x.shape[-1]).norm(dim=1).min().item() for x in inputs]
    scale = max(1.0, 1.0 / temperature)
    return dict(magnitude=scale, grad_magnitude=scale ** 2 * max([1.0] + [1.0 / n for n in norms if n > 0]))


def _randn(gen, shape, dtype):
    """Normal draws in `dtype` (the oracle's float64 copy holds exactly the same values)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _labels(gen, mode, n, classes):
    if mode == "all-positive":
        return torch.zeros(n, dtype=torch.int64)
    if mode == "no-positive":
        return torch.arange(n, dtype=torch.int64)
    return torch.randint(0, classes, (n,), generator=gen)


def _positives_without_negatives(q_labels, k_labels, offset):
    keys = torch.ones(len(q_labels), len(k_labels), dtype=torch.bool)
    if offset is not None:
        keys[torch.arange(len(q_labels)), torch.arange(len(q_labels)) + offset] = False
    positive = keys & (q_labels[:, None] == k_labels[None, :])
    return positive.any(1) & ~(keys & ~positive).any(1)


def test_positives_without_negatives_give_minus_inf():
    """exclude_positives (DCL) with a row whose every key is a positive: its log-sum-exp runs over no key,
    so its loss is -inf (the oracle's value too) and only its positive term sends a gradient. DCLLoss never
    builds such a row (it needs 2 samples, so every anchor has negatives)."""
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, dtype=torch.float64)
    q_labels, k_labels = torch.tensor([0, 0, 1]), torch.tensor([0, 0])
    loss = simclr_ext.contrastive_loss(q, k, q_labels, k_labels, 0.5, reduction="none", exclude_positives=True)
    oracle = ref.contrastive_loss(q.detach(), k, q_labels, k_labels, 0.5, reduction="none", exclude_positives=True)
    assert loss[:2].tolist() == oracle[:2].tolist() == [-math.inf, -math.inf]
    assert loss[2].item() == oracle[2].item() == 0.0  # no positive: 0, as without exclude_positives
    (grad,) = torch.autograd.grad(loss[:2].sum(), q)
    # the empty log-sum-exp sends nothing; the positive term -mean(s_pos) sends its gradient
    positive_term = -(torch.nn.functional.normalize(q[:2], dim=1) @ torch.nn.functional.normalize(k, dim=1).T / 0.5)
    (expected,) = torch.autograd.grad(positive_term.mean(1).sum(), q)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@st.composite
def contrastive_cases(draw):
    m, l, d = draw(ROWS), draw(ROWS), draw(DIMS)
    with_self = l >= m and draw(st.booleans())
    return dict(m=m, l=l, d=d, dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)),
                offset=draw(st.integers(0, l - m)) if with_self else None,
                labels=draw(st.sampled_from(["random", "all-positive", "no-positive"])),
                classes=draw(st.integers(1, 6)), label_dtype=draw(st.sampled_from(LABEL_DTYPES)),
                temperature=draw(TEMPERATURES), tensor_temperature=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), exclude=draw(st.booleans()),
                weighted=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


@FUZZ
@given(contrastive_cases())
def test_contrastive_loss_matches_the_oracle(case):
    gen = torch.Generator().manual_seed(case["seed"])
    m, l, d, dtype = case["m"], case["l"], case["d"], case["dtype"]
    k = _randn(gen, (l, d), dtype)
    offset = case["offset"]
    q = k[offset:offset + m].clone() if offset is not None else _randn(gen, (m, d), dtype)
    k_labels = _labels(gen, case["labels"], l, case["classes"])
    q_labels = k_labels[offset:offset + m].clone() if offset is not None else _labels(gen, case["labels"], m,
                                                                                     case["classes"])
    if case["labels"] == "no-positive" and offset is None:
        q_labels = q_labels + l  # disjoint from every key's label
    if case["exclude"]:  # rows with positives but no negative: test_positives_without_negatives_give_minus_inf
        assume(not _positives_without_negatives(q_labels, k_labels, offset).any())
    weight = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5 if case["weighted"] else None
    t = case["temperature"]
    inputs = [q, k] + ([torch.tensor(t, dtype=torch.float64)] if case["tensor_temperature"] else [])
    kw = dict(self_offset=offset, reduction=case["reduction"], exclude_positives=case["exclude"])
    ql, kl = q_labels.to(case["label_dtype"]), k_labels.to(case["label_dtype"])
    if case["label_dtype"] in (torch.int8, torch.uint8):
        assume(bool((ql.long() == q_labels).all() and (kl.long() == k_labels).all()))

    def fused(a, b, *temp):
        w = None if weight is None else weight.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
        return simclr_ext.contrastive_loss(a, b, ql, kl, temp[0] if temp else t, positive_weight=w, **kw)

    def oracle(a, b, *temp):
        w = None if weight is None else weight.to(a.dtype)
        return ref.contrastive_loss(a, b, q_labels, k_labels, temp[0] if temp else t, positive_weight=w, **kw)

    compare_with_reference(fused, oracle, inputs, dtype, gen, f"{case}", layout=_restride(case["layout"]),
                           **_magnitudes(t, q, k))


@FUZZ
@given(n=ROWS, d=DIMS, dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)),
       layout=st.sampled_from(LAYOUTS), temperature=TEMPERATURES, seed=st.integers(0, 2 ** 31 - 1),
       module=st.booleans())
def test_nt_xent_and_its_module_match_the_oracle(n, d, dtypes, layout, temperature, seed, module):
    """Mixed dtypes are promoted to the common one (a bfloat16 branch beside a float32 one)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.promote_types(*dtypes)
    z1, z2 = _randn(gen, (n, d), dtypes[0]), _randn(gen, (n, d), dtypes[1])
    fused = simclr_ext.NTXentLoss(temperature) if module else lambda a, b: simclr_ext.nt_xent(a, b, temperature)
    compare_with_reference(fused, lambda a, b: ref.nt_xent(a.to(common), b.to(common), temperature), [z1, z2],
                           common, gen, f"N={n} D={d} {dtypes} {layout} t={temperature}", layout=_restride(layout),
                           **_magnitudes(temperature, z1, z2))


@FUZZ
@given(n=ROWS, d=DIMS, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       scale=st.floats(-2.0, 3.0).map(lambda e: 10.0 ** e), tensor_scale=st.booleans(), normalize=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_clip_loss_matches_the_oracle(n, d, dtype, layout, scale, tensor_scale, normalize, seed):
    """logit_scale from 0.01 to 1000 (CLIP clamps its learned scale at 100), a number or a tensor; dot products
    of the features as given (open_clip's, the default) or cosines (normalize=True)."""
    gen = torch.Generator().manual_seed(seed)
    image, text = _randn(gen, (n, d), dtype), _randn(gen, (n, d), dtype)
    labels = torch.arange(n)
    inputs = [image, text] + ([torch.tensor(scale, dtype=torch.float64)] if tensor_scale else [])

    def oracle(a, b, *s):
        t = 1 / (s[0] if s else scale)
        return (ref.contrastive_loss(a, b, labels, labels, t, normalize=normalize)
                + ref.contrastive_loss(b, a, labels, labels, t, normalize=normalize)) / 2

    # Dot products scale the logits by the rows' norms: the rounding floor of an effective temperature.
    norm = 1.0 if normalize else max(x.double().norm(dim=1).max().item() for x in (image, text)) ** 2
    compare_with_reference(lambda a, b, *s: simclr_ext.ClipLoss(normalize=normalize)(a, b, s[0] if s else scale),
                           oracle, inputs, dtype, gen, f"N={n} D={d} {dtype} scale={scale} normalize={normalize}",
                           layout=_restride(layout), **_magnitudes(1 / (scale * max(norm, 1.0)), image, text))


@FUZZ
@given(b=ROWS, views=st.integers(1, 3), d=DIMS, dtype=st.sampled_from(DTYPES),
       labels=st.sampled_from(["random", "all-positive", "no-positive", "none"]), classes=st.integers(1, 6),
       temperature=TEMPERATURES, base=st.one_of(st.none(), st.floats(0.05, 1.0)), seed=st.integers(0, 2 ** 31 - 1))
def test_supcon_loss_matches_the_oracle(b, views, d, dtype, labels, classes, temperature, base, seed):
    gen = torch.Generator().manual_seed(seed)
    assume(labels != "none" or views >= 2)  # (N, D) rows without labels is an error (tested in test_supcon_loss)
    features = _randn(gen, (b, views, d), dtype)
    sample_labels = None if labels == "none" else _labels(gen, labels, b, classes)
    row_labels = (torch.arange(b) if sample_labels is None else sample_labels).repeat(views)
    factor = 1.0 if base is None else temperature / base

    def oracle(f):
        rows = f.transpose(0, 1).reshape(views * b, d)
        loss = ref.contrastive_loss(rows, rows, row_labels, row_labels, temperature, self_offset=0) * factor
        # No negative pair in the batch (one label for every row): pytorch-metric-learning's 0, which ours returns.
        return loss if (row_labels != row_labels[0]).any() else loss * 0

    module = simclr_ext.SupConLoss(temperature, base_temperature=base)
    compare_with_reference(lambda f: module(f, sample_labels), oracle, [features], dtype, gen,
                           f"B={b} V={views} D={d} {dtype} {labels} t={temperature}",
                           **_magnitudes(temperature, features))


def _dclw_weights(a, b, sigma):
    """DCLW's weights computed on the oracle's side, in the dtype it is given."""
    cos = (torch.nn.functional.normalize(a, dim=1) * torch.nn.functional.normalize(b, dim=1)).sum(1)
    return (2 - a.shape[0] * torch.softmax(cos / sigma, dim=0)).detach()


@FUZZ
@given(n=ROWS, d=DIMS, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), temperature=TEMPERATURES,
       sigma=st.one_of(st.none(), st.floats(0.05, 5.0)), seed=st.integers(0, 2 ** 31 - 1))
def test_dcl_and_dclw_losses_match_the_oracle(n, d, dtype, layout, temperature, sigma, seed):
    """sigma None: DCLLoss; a number: DCLWLoss. One sample leaves no negative: a ValueError."""
    gen = torch.Generator().manual_seed(seed)
    out0, out1 = _randn(gen, (n, d), dtype), _randn(gen, (n, d), dtype)
    module = simclr_ext.DCLLoss(temperature) if sigma is None else simclr_ext.DCLWLoss(temperature, sigma=sigma)
    if n == 1:
        with pytest.raises(ValueError, match="at least 2 samples"):
            module(out0.to(dtype), out1.to(dtype))
        return
    labels = torch.arange(n).repeat(2)

    def oracle(a, b):
        w = None if sigma is None else _dclw_weights(a, b, sigma).repeat(2)
        z = torch.cat([a, b])
        return ref.contrastive_loss(z, z, labels, labels, temperature, self_offset=0, exclude_positives=True,
                                    positive_weight=w)

    compare_with_reference(module, oracle, [out0, out1], dtype, gen, f"N={n} D={d} {dtype} sigma={sigma}",
                           layout=_restride(layout), **_magnitudes(temperature, out0, out1))


# ----- non-finite inputs and bad arguments --------------------------------------------------------------
@FUZZ
@given(n=ROWS, d=st.integers(1, 64), dtype=st.sampled_from(DTYPES), poison=st.sampled_from([math.nan, math.inf,
                                                                                            -math.inf]),
       where=st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.booleans()),
       loss=st.sampled_from(["nt_xent", "supcon", "dcl", "clip"]), seed=st.integers(0, 2 ** 31 - 1))
def test_non_finite_inputs_give_nan_where_the_oracle_does(n, d, dtype, poison, where, loss, seed):
    """A NaN/inf entry makes its row's normalized vector NaN, and that row is a key of every query: every
    per-anchor loss the oracle makes NaN is NaN (never a finite wrong value), the others match it, and the
    backward runs (gradients NaN, no crash)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _randn(gen, (n, d), dtype), _randn(gen, (n, d), dtype)
    (a if where[2] else b)[where[0] % n, where[1] % d] = poison
    z1, z2 = a.double(), b.double()
    a, b = a.requires_grad_(), b.requires_grad_()
    labels = torch.arange(n).repeat(2)
    if loss == "nt_xent":
        ours = simclr_ext.nt_xent(a, b, 0.2, reduction="none")
        oracle = ref.nt_xent(z1, z2, 0.2, reduction="none")
    elif loss == "supcon":
        ours = simclr_ext.SupConLoss(0.2)(torch.stack([a, b], dim=1))
        oracle = ref.contrastive_loss(torch.cat([z1, z2]), torch.cat([z1, z2]), labels, labels, 0.2, self_offset=0)
    elif loss == "dcl":
        assume(n >= 2)
        ours = simclr_ext.DCLLoss(0.2)(a, b)
        oracle = ref.contrastive_loss(torch.cat([z1, z2]), torch.cat([z1, z2]), labels, labels, 0.2, self_offset=0,
                                      exclude_positives=True)
    else:
        ours = simclr_ext.ClipLoss()(a, b, 5.0)
        ar = torch.arange(n)
        oracle = (ref.contrastive_loss(z1, z2, ar, ar, 0.2) + ref.contrastive_loss(z2, z1, ar, ar, 0.2)) / 2
    ours.sum().backward()
    assert torch.isnan(oracle).any(), "a NaN/inf input reaches every row of the oracle through the keys"
    assert torch.equal(torch.isnan(ours), torch.isnan(oracle)), f"ours {ours} vs the oracle {oracle}"


@FUZZ
@given(temperature=st.sampled_from([0.0, -0.5, math.nan, math.inf, -math.inf]), tensor=st.booleans(),
       loss=st.sampled_from(["nt_xent", "contrastive", "supcon", "dcl", "clip"]))
def test_bad_temperatures_and_logit_scales_raise_a_clear_error(temperature, tensor, loss):
    """Zero, negative, NaN or infinite: an error naming the argument (a tensor's value is checked by the
    op, which names the temperature it derives: 1 / logit_scale for CLIP)."""
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    t = torch.tensor(temperature) if tensor else temperature
    labels = torch.arange(5)
    calls = {
        "nt_xent": lambda: simclr_ext.nt_xent(z1, z2, t),
        "contrastive": lambda: simclr_ext.contrastive_loss(z1, z2, labels, labels, t),
        "supcon": lambda: simclr_ext.supcon_loss(torch.stack([z1, z2], 1), temperature=t),
        "dcl": lambda: simclr_ext.dcl_loss(z1, z2, temperature=t),
        "clip": lambda: simclr_ext.clip_loss(z1, z2, t),
    }
    name = "logit_scale" if loss == "clip" and not tensor else "temperature"
    with pytest.raises((ValueError, RuntimeError), match=rf"{name} must be finite and > 0, got"):
        calls[loss]()


# ----- the augmentation op ----------------------------------------------------------------------------
@st.composite
def augment_cases(draw):
    size = (draw(st.integers(1, 16)), draw(st.integers(1, 16)))
    return dict(b=draw(st.integers(1, 4)), channels=draw(st.sampled_from([1, 3])), size=size,
                src=(draw(st.integers(1, 24)), draw(st.integers(1, 24))), ragged=draw(st.booleans()),
                src_dtype=draw(st.sampled_from([torch.uint8, torch.float32, torch.float64, torch.float16,
                                                  torch.bfloat16])),
                channels_last_in=draw(st.booleans()), out_dtype=draw(st.sampled_from([torch.float32, torch.float16,
                                                                                      torch.bfloat16])),
                channels_last_out=draw(st.booleans()), scale_min=draw(st.floats(0.01, 1.0)),
                ratio=draw(st.tuples(st.floats(0.2, 1.0), st.floats(1.0, 5.0))),
                flip_p=draw(st.sampled_from([0.0, 0.5, 1.0])), rotation=draw(st.sampled_from([0.0, 15.0, 180.0])),
                jitter=draw(st.floats(0.0, 1.25)), jitter_p=draw(st.sampled_from([0.0, 0.8, 1.0])),
                grayscale_p=draw(st.sampled_from([0.0, 0.5, 1.0])), blur_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
                solarize_p=draw(st.sampled_from([0.0, 0.5, 1.0])), normalize=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _images(case, gen):
    b, c = case["b"], case["channels"]
    h, w = case["src"]
    sizes = [(h + (i * 7) % 5, w + (i * 3) % 4) if case["ragged"] else (h, w) for i in range(b)]
    images = []
    for hi, wi in sizes:
        x = torch.randint(0, 256, (c, hi, wi), generator=gen, dtype=torch.uint8)
        images.append(x if case["src_dtype"] == torch.uint8 else x.to(case["src_dtype"]) / 255)
    if case["ragged"]:
        return images
    batch = torch.stack(images)
    return batch.contiguous(memory_format=torch.channels_last) if case["channels_last_in"] else batch


@fuzz(40)
@given(augment_cases())
def test_augment_matches_the_oracle(case):
    """Random settings, 1-pixel images and outputs, ragged batches, every input and output dtype and layout."""
    gen = torch.Generator().manual_seed(case["seed"])
    aug = simclr_ext.SimCLRAugment(
        size=case["size"], scale=(case["scale_min"], 1.0), ratio=case["ratio"], flip_p=case["flip_p"],
        rotation_degrees=case["rotation"], jitter_strength=case["jitter"], jitter_p=case["jitter_p"],
        grayscale_p=case["grayscale_p"], blur_p=case["blur_p"], blur_kernel=1 if min(case["size"]) < 3 else None,
        solarize_p=case["solarize_p"], mean=(0.4,) * case["channels"] if case["normalize"] else None,
        std=(0.25,) * case["channels"] if case["normalize"] else None, out_dtype=case["out_dtype"],
        memory_format=torch.channels_last if case["channels_last_out"] else torch.contiguous_format,
        layout="NCHW")  # a 3 x 3 image could be either layout: "auto" refuses it (tested in test_augment_inputs)
    images = _images(case, gen)
    params = aug.sample(images, generator=gen)
    out = aug.view(images, params)
    assert out.dtype == case["out_dtype"] and out.shape == (case["b"], case["channels"], *case["size"])
    oracle = ref.augment(images, params, mean=aug.mean, std=aug.std, solarize_threshold=aug.solarize_threshold)
    assert_augment_close_to_reference(out, oracle, 1.0 if aug.std is None else 1.0 / min(aug.std))


@FUZZ
@given(poison=st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 1.5]), seed=st.integers(0, 2 ** 31 - 1))
def test_augment_refuses_float_pixels_outside_0_1(poison, seed):
    """Float images must hold [0, 1] values: NaN, inf or out-of-range pixels are refused with the argument
    named, never augmented into garbage."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 9, 9, generator=gen)
    images[int(torch.randint(0, 3, (1,), generator=gen)), 1, 4, 4] = poison
    aug = simclr_ext.SimCLRAugment(size=8)
    with pytest.raises(ValueError, match=r"images"):
        aug(images, generator=gen)
