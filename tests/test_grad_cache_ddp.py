"""GradCache under DistributedDataParallel, 2 gloo ranks on the CPU: the cached step's averaged parameter
gradients equal the uncached DDP step's on every rank, and each DDP module all-reduces its gradients once per
step (counted by a communication hook), for one model over both views (given as the encoder, or run inside a
function and named in `modules`) and for CLIP's two towers, each its own DDP module."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD, N, D_IN, D, CHUNK = 2, 7, 6, 5, 3  # per rank: 3 chunks per input, the last one short


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net(d_in, seed):
    torch.manual_seed(seed)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, D)).double()


def _counted(module):
    """module in DDP with a communication hook that counts its all-reduces (one per bucket per sync)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp, calls = DDP(module), []

    def hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(None, bucket)
    ddp.register_comm_hook(None, hook)
    return ddp, calls


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def _simclr_cases(x1, x2):
    """(name, cached step(ddp), uncached step(ddp)) over one model for both views."""
    import simclr_ext

    loss = simclr_ext.NTXentLoss(0.3, gather_distributed=True)

    def plain(ddp):
        loss(*ddp(torch.cat([x1, x2])).chunk(2)).backward()

    def as_encoder(ddp):
        simclr_ext.GradCache(ddp, loss, CHUNK).step(x1, x2)

    def in_a_function(ddp):
        def both(a, b):
            return tuple(ddp(torch.cat([a, b])).chunk(2))
        simclr_ext.GradCache(both, loss, CHUNK, modules=ddp).step((x1, x2))
    return [("encoder", as_encoder, plain), ("function", in_a_function, plain)]


def _worker(rank, port, seed, out_dir):
    import simclr_ext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(seed + rank)  # each rank its own batch
        x1 = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
        x2 = x1 + 0.3 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)
        texts = torch.randn(N, 3, generator=g, dtype=torch.float64)
        results = {}
        for name, cached, plain in _simclr_cases(x1, x2):
            ddp, calls = _counted(_net(D_IN, seed))
            plain(ddp)
            want, plain_calls = _grads(ddp.module), len(calls)
            ddp.zero_grad(set_to_none=True)
            calls.clear()
            cached(ddp)
            results[name] = {"got": _grads(ddp.module), "want": want, "calls": len(calls), "plain_calls": plain_calls}

        # CLIP: two towers, two DDP modules, a learnable logit scale (replicated: DDP does not average it)
        clip = simclr_ext.ClipLoss(gather_distributed=True)
        towers = {}
        for mode in ("plain", "cached"):
            (img, img_calls), (txt, txt_calls) = _counted(_net(D_IN, seed + 1)), _counted(_net(3, seed + 2))
            scale = nn.Parameter(torch.tensor(9.0, dtype=torch.float64))
            if mode == "plain":
                clip(img(x1), txt(texts), scale).backward()
            else:
                simclr_ext.GradCache([img, txt], clip, CHUNK).step(x1, texts, logit_scale=scale)
            towers[mode] = {"grads": _grads(img.module) + _grads(txt.module) + [scale.grad.clone()],
                            "calls": (len(img_calls), len(txt_calls))}
        results["clip"] = {"got": towers["cached"]["grads"], "want": towers["plain"]["grads"],
                           "calls": towers["cached"]["calls"], "plain_calls": towers["plain"]["calls"]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_cached_ddp_step_equals_uncached_with_one_allreduce(tmp_path):
    seed = int(torch.randint(1 << 30, ()).item())
    mp.spawn(_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("encoder", "function", "clip"):
        for r, res in enumerate(ranks):
            case = res[name]
            plain = case["plain_calls"] if isinstance(case["plain_calls"], tuple) else (case["plain_calls"],)
            assert min(plain) >= 1, f"{name} rank {r}: the uncached step all-reduced nothing ({plain})"
            assert case["calls"] == case["plain_calls"], \
                f"{name} rank {r}: {case['calls']} all-reduces in the cached step, {case['plain_calls']} uncached"
            for i, (got, want) in enumerate(zip(case["got"], case["want"])):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                           msg=f"{name} (seed {seed}) rank {r} parameter {i}")
        # the towers' and the model's gradients are averaged: every rank holds the same
        for i, (a, b) in enumerate(zip(ranks[0][name]["got"][:-1], ranks[1][name]["got"][:-1])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} parameter {i}: ranks differ")
