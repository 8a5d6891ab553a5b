"""NT-Xent across ranks on the CPU: 2 processes, gloo. The gathered loss and every gradient must equal
the single-process loss on the concatenated batch (the reference, float64)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simclr_reference

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(seed, n_per_rank, d_in, d):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(WORLD * n_per_rank, d_in, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(WORLD * n_per_rank, d_in, generator=g, dtype=torch.float64)
    z1 = torch.randn(WORLD * n_per_rank, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(WORLD * n_per_rank, d, generator=g, dtype=torch.float64)
    weight = torch.randn(d, d_in, generator=g, dtype=torch.float64)
    return x1, x2, z1, z2, weight


def _loss_worker(rank, port, seed, n, d_in, d, temperature, out_dir):
    import simclr_ext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x1, x2, z1, z2, weight = _global_batch(seed, n, d_in, d)
        rows = slice(rank * n, (rank + 1) * n)
        crit = simclr_ext.NTXentLoss(temperature=temperature, gather_distributed=True)
        # 1) the loss on raw projections: its value and the gradients of this rank's z1, z2
        a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
        loss = crit(a, b)
        loss.backward()
        # 2) inside DDP: the averaged parameter gradient of a linear projection
        lin = torch.nn.Linear(d_in, d, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(weight)
        ddp = torch.nn.parallel.DistributedDataParallel(lin)
        z = ddp(torch.cat([x1[rows], x2[rows]]))
        crit(*z.chunk(2)).backward()
        torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad, "gw": lin.weight.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n,d,temperature", [(3, 5, 0.5), (8, 130, 0.1)])
def test_gathered_loss_and_gradients_equal_single_process(tmp_path, n, d, temperature):
    seed, d_in = 1234 + n, 7
    mp.spawn(_loss_worker, args=(_free_port(), seed, n, d_in, d, temperature, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x1, x2, z1, z2, weight = _global_batch(seed, n, d_in, d)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = simclr_reference.nt_xent(a, b, temperature)
    ref.backward()
    # The mean of the ranks' losses is the global loss; rank r's gradients are W times its slice of the
    # global gradient (every rank's loss is a mean over its own rows), which DDP's averaging undoes.
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, ref.detach(), rtol=1e-10, atol=1e-12)
    for r, got in enumerate(ranks):
        rows = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(got["g1"] / WORLD, a.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["g2"] / WORLD, b.grad[rows], rtol=1e-9, atol=1e-12)

    w = weight.clone().requires_grad_()
    simclr_reference.nt_xent(x1 @ w.T, x2 @ w.T, temperature).backward()
    for got in ranks:
        torch.testing.assert_close(got["gw"], w.grad, rtol=1e-9, atol=1e-12)


def _pretrain_worker(rank, port, out_dir):
    from simclr_ext.train import pretrain

    torch.set_num_threads(1)  # two processes on a small shared CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        summary = pretrain(epochs=2, batch_size=128, width=4, proj_dim=16, knn_every=1, eval=False,
                           progress=False, out=out_dir, device="cpu")
        torch.save(summary, os.path.join(out_dir, f"summary{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_pretrain_smoke(tmp_path):
    mp.spawn(_pretrain_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["world_size"] == WORLD and ckpt["epoch"] == 2
    assert len(ckpt["rng"]["augment"]) == WORLD
    summaries = [torch.load(tmp_path / f"summary{r}.pt") for r in range(WORLD)]
    # Both ranks report the loss averaged over ranks, so they agree; it is finite and positive.
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
    assert 0 < summaries[0]["final_loss"] < 10
    assert (tmp_path / "summary.json").exists() and (tmp_path / "metrics.jsonl").exists()
