"""ClipLoss, SupConLoss and DCLLoss with gather_distributed=True on 2 gloo ranks: the mean of the ranks'
losses is the single-process loss of the concatenated batch, and each rank's gradients are WORLD times its
slice of that loss's gradient (DDP's averaging undoes the factor); logit_scale's and a tensor temperature's
gradients, averaged over ranks, are the single-process ones."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simclr_ext

WORLD = 2
N, V, D = 5, 3, 7  # per rank: odd sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = {
        "image": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "text": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "views": torch.randn(WORLD * N, V, D, generator=g, dtype=torch.float64),
        "labels": torch.randint(3, (WORLD * N,), generator=g),
        "out0": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "out1": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
    }
    x["scale"] = torch.tensor(12.5, dtype=torch.float64)
    x["temperature"] = torch.tensor(0.3, dtype=torch.float64)
    return x


def _losses(x, gather):
    """Every loss of the family on inputs x (leaves), returning {name: (loss, leaves)}."""
    def leaf(t):
        return t.detach().clone().requires_grad_(t.is_floating_point())

    out = {}
    a, b, s = leaf(x["image"]), leaf(x["text"]), leaf(x["scale"])
    out["clip"] = (simclr_ext.ClipLoss(gather_distributed=gather)(a, b, s), [a, b, s])
    f, t = leaf(x["views"]), leaf(x["temperature"])
    out["supcon"] = (simclr_ext.SupConLoss(t, gather_distributed=gather)(f, x["labels"]), [f, t])
    f2 = leaf(x["views"])
    out["supcon_views"] = (simclr_ext.SupConLoss(0.2, gather_distributed=gather)(f2), [f2])
    o0, o1, t2 = leaf(x["out0"]), leaf(x["out1"]), leaf(x["temperature"])
    out["dcl"] = (simclr_ext.DCLLoss(t2, gather_distributed=gather)(o0, o1), [o0, o1, t2])
    return out


def _rank_slice(x, rank):
    rows = slice(rank * N, (rank + 1) * N)
    return {k: (v[rows] if v.dim() else v) for k, v in x.items()}


def _worker(rank, port, seed, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, (loss, inputs) in _losses(_rank_slice(_global_inputs(seed), rank), gather=True).items():
            results[name] = (loss.detach(), torch.autograd.grad(loss, inputs))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_losses_equal_single_process(tmp_path):
    seed = int(torch.randint(1 << 30, ()).item())
    mp.spawn(_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _losses(_global_inputs(seed), gather=False)
    for name, (loss, inputs) in single.items():
        expected = torch.autograd.grad(loss, inputs)
        got_loss = sum(r[name][0] for r in ranks) / WORLD
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-10, atol=1e-12, msg=f"{name} (seed {seed}) loss")
        for i, want in enumerate(expected):
            if want.dim() == 0:  # a replicated scalar (logit_scale, temperature): DDP averages it over ranks
                got = sum(r[name][1][i] for r in ranks) / WORLD
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{name} (seed {seed}) scalar grad")
                continue
            for r, res in enumerate(ranks):
                rows = slice(r * N, (r + 1) * N)
                torch.testing.assert_close(res[name][1][i] / WORLD, want[rows], rtol=1e-9, atol=1e-12,
                                           msg=f"{name} (seed {seed}) grad {i} rank {r}")
