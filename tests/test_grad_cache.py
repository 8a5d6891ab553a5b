"""Gradient caching (simclr_ext.GradCache): the cached step's parameter gradients equal the uncached step's at a
batch that fits, for every loss of the package, uneven chunks, dropout and generator-driven augmentation (the
random state replayed per chunk), BatchNorm (per-chunk statistics, running statistics updated once per chunk),
bfloat16 autocast, a frozen tower, a grad scaler; bad input gets a clear error. DDP: test_grad_cache_ddp.py."""
import functools

import pytest
import torch
from parity import assert_matches_reference
from torch import nn

import simclr_ext

D_IN, D = 6, 5


def _mlp(dtype=torch.float64, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, 16), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, D)]
    return nn.Sequential(*layers).to(dtype)


def _grads(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _float64_grads(views, loss_fn, seed):
    """The uncached step's parameter gradients of the float64 model `_mlp(seed=seed)`: the oracle of the
    tolerance-rule tests."""
    model64 = _mlp(torch.float64, seed=seed)
    _uncached(model64, views, loss_fn)
    return _grads(list(model64.parameters()))


def _uncached(encoders, inputs, loss_fn, **loss_kwargs):
    """The plain step: each input through its encoder at once, the loss, backward."""
    encoders = encoders if isinstance(encoders, list) else [encoders] * len(inputs)
    outs = []
    for enc, x in zip(encoders, inputs):
        o = enc(*x) if isinstance(x, tuple) else enc(x)
        outs += list(o) if isinstance(o, tuple) else [o]
    loss = loss_fn(*outs, **loss_kwargs)
    loss.backward()
    return loss.detach()


def _chunked_with_graph(encoder, inputs, loss_fn, chunk):
    """Each chunk forwarded with a graph, in the cached step's order, then one backward: the gradients the
    cached step must reproduce when the forward draws random numbers (same draws, same order)."""
    outs = []
    for x in inputs:
        outs.append(torch.cat([encoder(x[i:i + chunk]) for i in range(0, len(x), chunk)]))
    loss = loss_fn(*outs)
    loss.backward()
    return loss.detach()


def _views(gen, n, dtype=torch.float64):
    x1 = torch.randn(n, D_IN, generator=gen, dtype=dtype)
    return x1, x1 + 0.3 * torch.randn(n, D_IN, generator=gen, dtype=dtype)


@pytest.mark.parametrize("n,chunk", [(13, 1), (13, 4), (13, 5), (13, 13), (13, 20), (2, 1)])
def test_float64_equals_uncached(gen, n, chunk):
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    params = list(model.parameters())
    x1, x2 = _views(gen, n)
    want_loss = _uncached(model, (x1, x2), loss_fn)
    want = _grads(params)
    loss = simclr_ext.GradCache(model, loss_fn, chunk).step(x1, x2)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(params), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_float32_within_the_tolerance_rule(gen):
    """float32 cached vs the float64 step: at most 2x the float32 uncached step's own error."""
    x1, x2 = _views(gen, 37)
    loss_fn = simclr_ext.NTXentLoss(0.2)
    ref64 = _float64_grads((x1, x2), loss_fn, seed=3)
    model32 = _mlp(torch.float32, seed=3)
    _uncached(model32, (x1.float(), x2.float()), loss_fn)
    ref32 = _grads(list(model32.parameters()))
    simclr_ext.GradCache(model32, loss_fn, 8).step(x1.float(), x2.float())
    for i, (g, r32, r64) in enumerate(zip(_grads(list(model32.parameters())), ref32, ref64)):
        assert_matches_reference(g, r32, r64, torch.float32, f"param {i}")


def _two_towers(dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, 12), nn.GELU(), nn.Linear(12, D)).to(dtype), \
        nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, D)).to(dtype)


# name -> (encoders, inputs(gen), loss_fn, loss kwargs, extra parameters that must get gradients)
def _case(name, gen):
    n = 11
    x1, x2 = _views(gen, n)
    labels = torch.randint(0, 4, (n,), generator=gen)
    model = _mlp()
    t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    if name == "ntxent_learned_temperature":
        return model, (x1, x2), simclr_ext.NTXentLoss(t), {}, [t]
    if name == "nt_xent_functional":
        return model, (x1, x2), functools.partial(simclr_ext.nt_xent, temperature=0.1), {}, []
    if name == "clip_two_towers":
        img, txt = _two_towers()
        scale = nn.Parameter(torch.tensor(14.0, dtype=torch.float64))
        texts = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        return [img, txt], (x1, texts), simclr_ext.ClipLoss(), {"logit_scale": scale}, [scale]
    if name == "supcon_labels":
        return model, (x1,), simclr_ext.SupConLoss(t), {"labels": labels}, [t]
    if name == "supcon_views":  # one encoder call returns (B, V, D): both views stacked per sample
        def views(a, b):
            return torch.stack([model(a), model(b)], dim=1)
        return [views], ((x1, x2),), simclr_ext.SupConLoss(0.2), {}, list(model.parameters())
    if name == "dcl":
        return model, (x1, x2), simclr_ext.DCLLoss(t), {}, [t]
    if name == "dclw":
        return model, (x1, x2), simclr_ext.DCLWLoss(0.1, 0.5), {}, []
    if name == "contrastive_loss":  # queries from view 1 against keys of view 2, class labels
        def loss(q, k, labels):
            return simclr_ext.contrastive_loss(q, k, labels, labels, temperature=t)
        return model, (x1, x2), loss, {"labels": labels}, [t]
    raise ValueError(name)


LOSS_CASES = ["ntxent_learned_temperature", "nt_xent_functional", "clip_two_towers", "supcon_labels",
              "supcon_views", "dcl", "dclw", "contrastive_loss"]


@pytest.mark.parametrize("name", LOSS_CASES)
def test_every_loss_equals_uncached(gen, name):
    encoders, inputs, loss_fn, kwargs, extra = _case(name, gen)
    modules = [e for e in (encoders if isinstance(encoders, list) else [encoders]) if isinstance(e, nn.Module)]
    params = list({id(p): p for p in [q for m in modules for q in m.parameters()] + extra}.values())
    want_loss = _uncached(encoders, inputs, loss_fn, **kwargs)
    want = _grads(params)
    loss = simclr_ext.GradCache(encoders, loss_fn, 4).step(*inputs, **kwargs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for i, (g, w) in enumerate(zip(_grads(params), want)):
        assert w.abs().max() > 0, f"{name}: parameter {i} got no gradient in the uncached step"
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"{name}: parameter {i}")


def test_functional_form_equals_the_class(gen):
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    x1, x2 = _views(gen, 9)
    a = simclr_ext.GradCache(model, loss_fn, 2).step(x1, x2)
    want = _grads(list(model.parameters()))
    b = simclr_ext.cached_contrastive_step(model, (x1, x2), loss_fn, 2)
    assert torch.equal(a, b)
    for g, w in zip(_grads(list(model.parameters())), want):
        assert torch.equal(g, w)


def test_one_forward_for_both_views_returning_a_tuple(gen):
    """The recipe's form: one encoder call takes both views' chunks and returns (z1, z2)."""
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    x1, x2 = _views(gen, 10)

    def both(a, b):
        return tuple(model(torch.cat([a, b])).chunk(2))
    _uncached([both], ((x1, x2),), loss_fn)
    want = _grads(list(model.parameters()))
    simclr_ext.GradCache([both], loss_fn, 3).step((x1, x2))
    for g, w in zip(_grads(list(model.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_dict_inputs_are_passed_as_keywords(gen):
    img, txt = _two_towers()
    texts = {"tokens": torch.randn(7, 3, generator=gen, dtype=torch.float64),
             "mask": (torch.rand(7, 3, generator=gen) > 0.3).double()}

    def text_tower(tokens, mask):
        return txt(tokens * mask)
    images, scale = torch.randn(7, D_IN, generator=gen, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)
    loss_fn = simclr_ext.ClipLoss()
    loss_fn(img(images), text_tower(**texts), scale).backward()
    want = _grads(list(txt.parameters()))
    img.zero_grad()
    simclr_ext.GradCache([img, text_tower], loss_fn, 2).step(images, texts, logit_scale=scale)
    for g, w in zip(_grads(list(txt.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradients_accumulate_like_backward(gen):
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    x1, x2 = _views(gen, 8)
    _uncached(model, (x1, x2), loss_fn)
    once = _grads(list(model.parameters()))
    cache = simclr_ext.GradCache(model, loss_fn, 3)
    cache.step(x1, x2)
    cache.step(x1, x2)
    for g, w in zip(_grads(list(model.parameters())), once):
        torch.testing.assert_close(g, 2 * w, rtol=1e-10, atol=1e-12)


def test_frozen_tower_gets_nothing_and_is_no_error(gen):
    img, txt = _two_towers()
    txt.requires_grad_(False)
    x, texts = torch.randn(9, D_IN, generator=gen, dtype=torch.float64), torch.randn(9, 3, generator=gen,
                                                                                     dtype=torch.float64)
    scale = torch.tensor(8.0, dtype=torch.float64)
    _uncached([img, txt], (x, texts), simclr_ext.ClipLoss(), logit_scale=scale)
    want = _grads(list(img.parameters()))
    simclr_ext.GradCache([img, txt], simclr_ext.ClipLoss(), 4).step(x, texts, logit_scale=scale)
    for g, w in zip(_grads(list(img.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in txt.parameters())


def test_scaler_scales_the_parameter_gradients(gen):
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    x1, x2 = _views(gen, 8)
    _uncached(model, (x1, x2), loss_fn)
    want = _grads(list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    loss = simclr_ext.GradCache(model, loss_fn, 3, scaler=scaler).step(x1, x2)
    assert loss.requires_grad is False
    for g, w in zip(_grads(list(model.parameters())), want):
        torch.testing.assert_close(g, 64.0 * w, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- random state replay
@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_dropout_replayed_per_chunk(gen, chunk):
    """The second forward of each chunk draws the first's dropout mask: the gradients equal those of the same
    chunks forwarded once with a graph from the same random state, and the random state after the step is
    where that forward left it."""
    model, loss_fn = _mlp(dropout=0.4), simclr_ext.NTXentLoss(0.5)
    params = list(model.parameters())
    x1, x2 = _views(gen, 14)
    torch.manual_seed(1234)
    _chunked_with_graph(model, (x1, x2), loss_fn, chunk)
    want, after_want = _grads(params), torch.rand(3)
    torch.manual_seed(4321)  # another mask: the gradients differ, so the comparison can fail
    _chunked_with_graph(model, (x1, x2), loss_fn, chunk)
    other = _grads(params)
    assert max((a - b).abs().max() for a, b in zip(other, want)) > 1e-6
    torch.manual_seed(1234)
    simclr_ext.GradCache(model, loss_fn, chunk).step(x1, x2)
    got, after = _grads(params), torch.rand(3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.equal(after, after_want)


def test_generator_driven_augmentation_replayed(gen):
    """An augmentation drawing from its own torch.Generator (passed in `generators`) sees the same numbers in
    both passes; the generator ends where one chunked forward leaves it."""
    model, loss_fn = _mlp(), simclr_ext.NTXentLoss(0.5)
    params = list(model.parameters())
    aug_gen = torch.Generator()

    def augmented(x):
        noise = torch.randn(x.shape, generator=aug_gen, dtype=x.dtype)
        scale = torch.rand(x.shape[0], 1, generator=aug_gen, dtype=x.dtype) + 0.5
        return model(x * scale + 0.2 * noise)
    x1, x2 = _views(gen, 11)
    aug_gen.manual_seed(99)
    _chunked_with_graph(augmented, (x1, x2), loss_fn, 4)
    want, state_want = _grads(params), aug_gen.get_state()
    aug_gen.manual_seed(99)
    simclr_ext.GradCache(augmented, loss_fn, 4, modules=model, generators=[aug_gen]).step(x1, x2)
    for g, w in zip(_grads(params), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.equal(aug_gen.get_state(), state_want)


# ------------------------------------------------------------------------------------------- BatchNorm
def _bn_model(seed=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D)).double()


def test_batchnorm_in_eval_mode_equals_uncached(gen):
    """BatchNorm with fixed statistics makes each row independent of its chunk: cached == uncached."""
    model, loss_fn = _bn_model(), simclr_ext.NTXentLoss(0.5)
    model[1].running_mean.normal_(generator=gen)
    model[1].running_var.uniform_(0.5, 2.0, generator=gen)
    model.eval()
    x1, x2 = _views(gen, 12)
    _uncached(model, (x1, x2), loss_fn)
    want = _grads(list(model.parameters()))
    simclr_ext.GradCache(model, loss_fn, 5).step(x1, x2)
    for g, w in zip(_grads(list(model.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_batchnorm_in_training_uses_per_chunk_statistics(gen):
    """In training mode each chunk is normalized by its own statistics (documented): the gradients equal one
    graph over the same chunks, and the running statistics are updated once per chunk, as that forward does
    (the second pass's updates are undone)."""
    x1, x2 = _views(gen, 13)
    loss_fn = simclr_ext.NTXentLoss(0.5)
    ref = _bn_model()
    _chunked_with_graph(ref, (x1, x2), loss_fn, 5)
    want = _grads(list(ref.parameters()))
    model = _bn_model()
    simclr_ext.GradCache(model, loss_fn, 5).step(x1, x2)
    for g, w in zip(_grads(list(model.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[1], name), getattr(ref[1], name), rtol=1e-12, atol=1e-12)
    assert int(model[1].num_batches_tracked) == 6  # 3 chunks per view


# ---------------------------------------------------------------------------------------------- autocast
def test_bfloat16_autocast_within_the_tolerance_rule(gen):
    """Under CPU autocast (bfloat16) both passes and the loss run in autocast: the cached step's error against
    the float64 step is at most 2x the uncached autocast step's own."""
    x1, x2 = _views(gen, 24)
    loss_fn = simclr_ext.NTXentLoss(0.5)
    ref64 = _float64_grads((x1, x2), loss_fn, seed=5)
    model = _mlp(torch.float32, seed=5)
    a, b = x1.float(), x2.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _uncached(model, (a, b), loss_fn)
    ref_bf16 = _grads(list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        simclr_ext.GradCache(model, loss_fn, 7).step(a, b)
    for i, (g, r, r64) in enumerate(zip(_grads(list(model.parameters())), ref_bf16, ref64)):
        assert g.dtype == torch.float32
        assert_matches_reference(g, r, r64, torch.bfloat16, f"param {i}")


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("chunk,err", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_size(chunk, err):
    with pytest.raises(err, match="chunk_size"):
        simclr_ext.GradCache(_mlp(), simclr_ext.NTXentLoss(), chunk)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match=r"encoders\[1\] must be callable"):
        simclr_ext.GradCache([_mlp(), "tower"], simclr_ext.ClipLoss(), 2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        simclr_ext.GradCache(_mlp(), 3, 2)
    with pytest.raises(TypeError, match="modules must be an nn.Module"):
        simclr_ext.GradCache(_mlp(), simclr_ext.NTXentLoss(), 2, modules=lambda x: x)
    with pytest.raises(TypeError, match=r"generators\[0\] must be a torch.Generator"):
        simclr_ext.GradCache(_mlp(), simclr_ext.NTXentLoss(), 2, generators=[0])


def test_bad_step_inputs(gen):
    model = _mlp()
    cache = simclr_ext.GradCache(model, simclr_ext.NTXentLoss(), 2)
    x1, x2 = _views(gen, 6)
    with pytest.raises(ValueError, match="same batch size"):
        simclr_ext.GradCache([lambda a, b: model(a)], simclr_ext.SupConLoss(), 2).step((x1, x2[:5]))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a tensor"):
        cache.step(x1, "some text")
    with pytest.raises(TypeError, match=r"inputs\[1\]\[1\] must be a torch.Tensor, got int"):
        cache.step(x1, (x2, 2))
    with pytest.raises(ValueError, match="batch size 0"):
        cache.step(x1[:0], x2[:0])
    with pytest.raises(ValueError, match="0-d"):
        cache.step(torch.tensor(1.0), x2)
    with pytest.raises(ValueError, match="2 inputs for 1 encoders"):
        simclr_ext.GradCache([model], simclr_ext.NTXentLoss(), 2).step(x1, x2)
    with pytest.raises(ValueError, match="non-leaf"):
        cache.step(x1 * torch.ones((), dtype=x1.dtype, requires_grad=True), x2)
    with pytest.raises(RuntimeError, match="grad mode"), torch.no_grad():
        cache.step(x1, x2)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("encoder,err,match", [
    (lambda x: {"z": x}, TypeError, r"encoders\[0\] output must be a torch.Tensor"),
    (lambda x: (x, "h"), TypeError, r"output\[1\] must be a torch.Tensor"),
    (lambda x: x.long(), TypeError, "floating"),
    (lambda x: x.sum(), ValueError, "one row per input sample"),
    (lambda x: (), TypeError, "empty"),
])
def test_bad_encoder_outputs(gen, encoder, err, match):
    with pytest.raises(err, match=match):
        simclr_ext.GradCache(encoder, simclr_ext.NTXentLoss(), 4).step(*_views(gen, 6))


def test_bad_loss_outputs(gen):
    x1, x2 = _views(gen, 6)
    model = _mlp()
    with pytest.raises(TypeError, match="output_dict=False"):
        simclr_ext.GradCache([model, model], simclr_ext.ClipLoss(), 4).step(x1, x2, logit_scale=10.0,
                                                                             output_dict=True)
    with pytest.raises(ValueError, match="scalar"):
        simclr_ext.GradCache(model, simclr_ext.NTXentLoss(reduction="none"), 4).step(x1, x2)
    with pytest.raises(RuntimeError, match="does not depend"):
        simclr_ext.GradCache(model, lambda a, b: torch.zeros(()), 4).step(x1, x2)
