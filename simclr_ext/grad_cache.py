"""Gradient caching: one contrastive step over a batch whose activations would not fit, at the memory of a chunk.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP
2021 (github.com/luyug/GradCache). The loss of a contrastive batch couples every sample, but its gradient with
respect to the encoder factors through the embeddings: dL/dtheta = sum_i (dL/dz_i) dz_i/dtheta. So

1. the encoders run over chunks of the batch without a graph (torch.no_grad) and the embeddings are kept;
2. the loss of the whole batch and its gradient with respect to every embedding come from one call on the
   concatenated embeddings (detached leaves; with this package's losses, one fused op without N x N logits);
3. each chunk runs again with a graph, and its slice of the cached embedding gradient is backpropagated
   (torch.autograd.backward(chunk_embeddings, grad_slice)), accumulating into the parameters' .grad.

Peak memory is one chunk's activations plus the (N, D) embeddings, whatever N; the price is a second forward.
The second forward of a chunk must compute what the first did: each chunk's random state (CPU, the CUDA
devices the inputs and modules live on, and any torch.Generator passed in `generators`) is recorded before the
first pass and replayed before the second, so dropout and random augmentation inside the encoder draw the same
numbers. After the step every random state is where the first pass left it.

BatchNorm: statistics are computed per chunk (as in the GradCache library), so a model with BatchNorm in
training mode gets a different gradient than the uncached step unless the chunk holds the whole batch; the
running statistics are updated once per chunk, as a plain chunked run would (the second pass's update is
undone for the modules this class knows, see `modules`).
"""
import contextlib
import numbers
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["GradCache", "cached_contrastive_step"]


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _as_list(x, what, check):
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    for i, item in enumerate(items):
        check(item, f"{what}[{i}]" if isinstance(x, (list, tuple)) else what)
    return items


def _check_callable(f, name):
    if not callable(f):
        raise TypeError(f"{name} must be callable (an nn.Module or a function), got {type(f).__name__}")


def _check_module(m, name):
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")


def _check_generator(g, name):
    if not isinstance(g, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(g).__name__}")


class _Input:
    """One encoder's input: a tensor (encoder(x)), a list/tuple of tensors (encoder(*xs)) or a dict of
    tensors (encoder(**xs)), every tensor batched along dim 0 with the same batch size."""

    def __init__(self, value, name):
        if isinstance(value, torch.Tensor):
            self.kind, tensors = "tensor", {"": value}
        elif isinstance(value, (list, tuple)):
            self.kind, tensors = "args", {f"[{i}]": v for i, v in enumerate(value)}
        elif isinstance(value, dict):
            self.kind, tensors = "kwargs", {f"[{k!r}]": v for k, v in value.items()}
        else:
            raise TypeError(f"{name} must be a tensor, a list/tuple of tensors or a dict of tensors, "
                            f"got {type(value).__name__}")
        if not tensors:
            raise ValueError(f"{name} is empty: an encoder needs at least one batched tensor")
        sizes = {}
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}{key} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() == 0:
                raise ValueError(f"{name}{key} must be batched along dim 0, got a 0-d tensor")
            if t.requires_grad and t.grad_fn is not None:
                raise ValueError(f"{name}{key} is the output of a graph (requires grad, non-leaf): gradient caching "
                                 "backpropagates into the encoders, once per chunk; pass it detached")
            sizes[key] = t.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{name}: every tensor must have the same batch size (dim 0), got "
                             + ", ".join(f"{name}{k}: {n}" for k, n in sizes.items()))
        self.value, self.name = value, name
        self.batch = next(iter(sizes.values()))
        if self.batch == 0:
            raise ValueError(f"{name} has batch size 0: nothing to encode")

    def chunks(self, size):
        """(start, stop) of each chunk; the last one may be shorter."""
        return [(i, min(i + size, self.batch)) for i in range(0, self.batch, size)]

    def call(self, encoder, lo, hi):
        v = self.value
        if self.kind == "tensor":
            return encoder(v[lo:hi])
        if self.kind == "args":
            return encoder(*(t[lo:hi] for t in v))
        return encoder(**{k: t[lo:hi] for k, t in v.items()})


def _outputs(out, name, rows):
    """The encoder's output as a list of embedding tensors, each (rows, ...)."""
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    if not items:
        raise TypeError(f"{name} returned an empty {type(out).__name__}: it must return a tensor or a tuple of "
                        "tensors")
    for i, t in enumerate(items):
        where = f"{name} output[{i}]" if isinstance(out, (list, tuple)) else f"{name} output"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor (embeddings), got {type(t).__name__}; wrap the "
                            "encoder to return the tensors the loss takes (e.g. lambda x: model(x)[1])")
        if not t.is_floating_point():
            raise TypeError(f"{where} must be a floating tensor, got {t.dtype}")
        if t.dim() == 0 or t.shape[0] != rows:
            raise ValueError(f"{where} must have one row per input sample ({rows} in this chunk), got shape "
                             f"{list(t.shape)}")
    return items


class _RandomState:
    """The random states a chunk's forward may draw from: the CPU generator, the CUDA generators of `devices`,
    and the given torch.Generators. capture() records them, restore() puts them back."""

    def __init__(self, devices, generators):
        self.devices, self.generators = devices, generators

    def capture(self):
        cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        return torch.get_rng_state(), cuda, [g.get_state() for g in self.generators]

    def restore(self, state):
        cpu, cuda, gens = state
        torch.set_rng_state(cpu)
        for d, s in zip(self.devices, cuda):
            torch.cuda.set_rng_state(s, d)
        for g, s in zip(self.generators, gens):
            g.set_state(s)


def _cuda_devices(tensors):
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


def _is_ddp(m):
    return isinstance(m, nn.parallel.DistributedDataParallel)


class GradCache:
    """A contrastive training step over a large batch with the activation memory of `chunk_size` samples.

    `GradCache(encoders, loss_fn, chunk_size).step(*inputs, **loss_kwargs)` computes
    `loss_fn(*embeddings, **loss_kwargs)`, where each input i is encoded by its encoder chunk by chunk, and
    accumulates into every parameter's `.grad` the gradient that `loss.backward()` of the uncached step would
    (equal up to rounding; see the BatchNorm note of the module). Returns the loss, detached. It replaces
    `loss.backward()`: zero the gradients and step the optimizer around it as usual.

    Args:
        encoders: one callable (an nn.Module or a function of a chunk), used for every input, or a list with
            one callable per input (CLIP: [image_tower, text_tower]). An encoder returns a tensor (rows, ...)
            or a tuple of them; each output is concatenated over the chunks and handed to the loss in order
            (outputs of input 0 first). Inputs: a tensor `x` (called encoder(x[lo:hi])), a tuple of tensors
            (encoder(*chunks): e.g. both SimCLR views into one forward, returning (z1, z2)) or a dict of
            tensors (encoder(**chunks): a tokenizer's output).
        loss_fn: the loss of the whole batch, e.g. NTXentLoss(), ClipLoss(), SupConLoss(), DCLLoss(); a 0-d
            tensor. Its own parameters (a learnable temperature, a logit_scale passed in loss_kwargs) get
            their gradients from its backward directly.
        chunk_size: samples per chunk (>= 1); the last chunk holds the remainder.
        modules: the nn.Modules the encoders run, when an encoder is a function wrapping them (modules given
            as encoders are found by themselves). Their buffers (BatchNorm running statistics) are left as the
            first pass left them; a DistributedDataParallel one synchronizes its gradients once per step (its
            backward runs under `no_sync()` but for its last chunk: the last chunk of the last input its
            encoder is given for, or, for one named here only, of the last input).
        generators: torch.Generators the encoders draw from (an augmentation's), replayed per chunk like the
            global CPU and CUDA generators.
        scaler: a torch.amp.GradScaler: the loss is scaled before its backward (float16 training), so the
            parameters receive scaled gradients as with `scaler.scale(loss).backward()`.

    Under `torch.autocast`, call `step` inside the autocast context: both passes and the loss then run in it.
    Under DDP with a gathered loss (`gather_distributed=True`) every rank must call `step` with the same
    number of chunks per input (equal per-rank batch sizes), as the uncached step requires.
    """

    def __init__(self, encoders, loss_fn: Callable, chunk_size: int, *, modules=(),
                 generators: Sequence[torch.Generator] = (), scaler: Optional[torch.amp.GradScaler] = None):
        self.encoders = _as_list(encoders, "encoders", _check_callable)
        self.single_encoder = not isinstance(encoders, (list, tuple))
        if not self.encoders:
            raise ValueError("encoders is empty: give one callable, or one per input")
        _check_callable(loss_fn, "loss_fn")
        self.loss_fn = loss_fn
        self.chunk_size = _check_chunk_size(chunk_size)
        self.extra_modules = _as_list(modules, "modules", _check_module)
        self.generators = _as_list(generators, "generators", _check_generator)
        if scaler is not None and not hasattr(scaler, "scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler

    # ------------------------------------------------------------------------------------------ set-up
    def _encoders_for(self, n_inputs):
        if self.single_encoder:
            return self.encoders * n_inputs
        if len(self.encoders) != n_inputs:
            raise ValueError(f"got {n_inputs} inputs for {len(self.encoders)} encoders: give one input per encoder")
        return self.encoders

    def _modules(self, encoders):
        found = [e for e in encoders if isinstance(e, nn.Module)] + self.extra_modules
        return list({id(m): m for m in found}.values())

    def _sync_points(self, encoders, modules, n_inputs):
        """{id(ddp module): index of the input whose last chunk synchronizes it}."""
        points = {}
        for m in modules:
            if _is_ddp(m):
                uses = [i for i, e in enumerate(encoders) if e is m]
                points[id(m)] = uses[-1] if uses else n_inputs - 1
        return points

    # ------------------------------------------------------------------------------------------- step
    def step(self, *inputs, **loss_kwargs) -> torch.Tensor:
        """inputs: one per encoder (see the class); loss_kwargs: passed to loss_fn (labels=, logit_scale=).
        Returns the loss (detached); the parameters' gradients are accumulated."""
        if not torch.is_grad_enabled():
            raise RuntimeError("GradCache.step needs grad mode: it was called under torch.no_grad() / inference mode")
        if not inputs:
            raise ValueError("GradCache.step needs at least one input")
        batches = [_Input(x, f"inputs[{i}]") for i, x in enumerate(inputs)]
        encoders = self._encoders_for(len(batches))
        modules = self._modules(encoders)
        tensors = [t for m in modules for t in m.parameters()]
        tensors += [t for b in batches for t in _tensors_of(b.value)]
        random = _RandomState(_cuda_devices(tensors), self.generators)

        states, embeddings = self._first_pass(batches, encoders, random)
        after_first = random.capture()
        buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
        loss, grads = self._loss_and_grads(embeddings, loss_kwargs)
        try:
            self._second_pass(batches, encoders, random, states, grads, self._sync_points(encoders, modules,
                                                                                         len(batches)), modules)
        finally:
            random.restore(after_first)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return loss

    __call__ = step

    def _first_pass(self, batches, encoders, random):
        """Every chunk's random state and, per input, the list of its outputs concatenated over chunks."""
        states, embeddings = [], []
        with torch.no_grad():
            for i, (batch, encoder) in enumerate(zip(batches, encoders)):
                per_output = None
                for lo, hi in batch.chunks(self.chunk_size):
                    states.append(random.capture())
                    outs = _outputs(batch.call(encoder, lo, hi), f"encoders[{i}]", hi - lo)
                    if per_output is None:
                        per_output = [[] for _ in outs]
                    elif len(outs) != len(per_output):
                        raise ValueError(f"encoders[{i}] returned {len(outs)} outputs for rows {lo}:{hi}, "
                                         f"{len(per_output)} for the first chunk")
                    for acc, t in zip(per_output, outs):
                        acc.append(t)
                embeddings.append([torch.cat(parts) for parts in per_output])
        return states, embeddings

    def _loss_and_grads(self, embeddings, loss_kwargs):
        """The loss on detached leaves of the embeddings, and the leaves' gradients (zeros where unused)."""
        leaves = [[e.detach().requires_grad_() for e in outs] for outs in embeddings]
        loss = self.loss_fn(*(leaf for outs in leaves for leaf in outs), **loss_kwargs)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__} (ClipLoss: output_dict=False)")
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a 0-d (scalar) loss, got shape {list(loss.shape)} "
                             "(reduction='mean' or 'sum')")
        if not loss.requires_grad:
            raise RuntimeError("the loss does not depend on the embeddings (it does not require grad)")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = [[leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in outs] for outs in leaves]
        return loss.detach(), grads

    def _second_pass(self, batches, encoders, random, states, grads, sync_points, modules):
        k = 0
        for i, (batch, encoder) in enumerate(zip(batches, encoders)):
            spans = batch.chunks(self.chunk_size)
            for c, (lo, hi) in enumerate(spans):
                random.restore(states[k])
                k += 1
                last = c == len(spans) - 1
                with contextlib.ExitStack() as stack:
                    for m in modules:
                        if id(m) in sync_points and not (last and sync_points[id(m)] == i):
                            stack.enter_context(m.no_sync())
                    outs = _outputs(batch.call(encoder, lo, hi), f"encoders[{i}]", hi - lo)
                    self._check_replay(outs, grads[i], i, lo, hi)
                    pairs = [(o, g[lo:hi]) for o, g in zip(outs, grads[i]) if o.requires_grad]
                    if pairs:  # a frozen tower (no parameter requires grad) has nothing to backpropagate
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    @staticmethod
    def _check_replay(outs, grads, i, lo, hi):
        if len(outs) != len(grads):
            raise RuntimeError(f"encoders[{i}] returned {len(outs)} outputs for rows {lo}:{hi} in the second pass, "
                               f"{len(grads)} in the first: the encoder must be deterministic given its random state")
        for j, (o, g) in enumerate(zip(outs, grads)):
            if o.shape[1:] != g.shape[1:] or o.dtype != g.dtype:
                raise RuntimeError(f"encoders[{i}] output[{j}] for rows {lo}:{hi} is {o.dtype} {list(o.shape)} in the "
                                   f"second pass, {g.dtype} {[hi - lo] + list(g.shape[1:])} in the first (was the "
                                   "autocast state changed inside the step?)")


def _tensors_of(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return list(value.values()) if isinstance(value, dict) else list(value)


def cached_contrastive_step(encoders, inputs, loss_fn: Callable, chunk_size: int, *, modules=(),
                            generators: Sequence[torch.Generator] = (), scaler=None, **loss_kwargs) -> torch.Tensor:
    """Functional form of `GradCache`: `cached_contrastive_step(model, (x1, x2), NTXentLoss(), 256)` is
    `GradCache(model, NTXentLoss(), 256).step(x1, x2)`. `inputs`: a tuple with one entry per input (a
    single tensor is one input). Returns the loss (detached); gradients accumulate into `.grad`."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    cache = GradCache(encoders, loss_fn, chunk_size, modules=modules, generators=generators, scaler=scaler)
    return cache.step(*inputs, **loss_kwargs)
