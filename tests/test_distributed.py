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


def _gather_worker(rank, port, out_dir):
    """The gather's collectives, the once-per-shape check, a shape mismatch, and the memory bank under
    gather_distributed beside lightly's."""
    import simclr_ext
    from simclr_ext import distributed as sd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    out = {}
    try:
        calls = []
        names = {"all_gather_single": "gather", "all_gather_into_tensor": "gather", "all_gather": "gather",
                 "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
                 "all_reduce": "all_reduce"}
        real = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

        def counting(name):
            def call(*args, **kwargs):
                calls.append(names[name])
                return real[name](*args, **kwargs)
            return call

        for name in real:
            setattr(dist, name, counting(name))
        try:
            crit = simclr_ext.NTXentLoss(temperature=0.3, gather_distributed=True)
            g = torch.Generator().manual_seed(100 + rank)
            for n in (4, 4, 4, 6, 6, 3):
                a, b = (torch.randn(n, 5, generator=g, requires_grad=True) for _ in range(2))
                crit(a, b).backward()
                out.setdefault("calls", []).append(list(calls))
                calls.clear()
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)

        # Different batch sizes on the ranks (a new shape on both): a clear error on every rank.
        n = 3 + rank
        try:
            crit(torch.randn(n, 5), torch.randn(n, 5))
        except ValueError as e:
            out["mismatch"] = str(e)

        # Memory bank + gather_distributed: every rank's bank gets the z2 rows of all ranks, as lightly's does.
        lightly_loss = pytest.importorskip("lightly.loss")
        torch.manual_seed(7)
        theirs = lightly_loss.NTXentLoss(temperature=0.4, memory_bank_size=(10, 5), gather_distributed=True)
        torch.manual_seed(7)
        mine = simclr_ext.NTXentLoss(temperature=0.4, memory_bank_size=(10, 5), gather_distributed=True)
        out["bank_steps"] = []
        for _ in range(3):
            a, b = (torch.randn(3, 5, generator=g, requires_grad=True) for _ in range(2))
            a2, b2 = (x.detach().clone().requires_grad_() for x in (a, b))
            ours, ref_loss = mine(a, b), theirs(a2, b2)
            ours.backward()
            ref_loss.backward()
            out["bank_steps"].append({"ours": ours.detach(), "theirs": ref_loss.detach(), "g": (a.grad, b.grad),
                                      "g_ref": (a2.grad, b2.grad), "bank": mine.bank.clone(),
                                      "bank_ref": theirs.memory_bank.bank.clone(), "ptr": int(mine.bank_ptr),
                                      "ptr_ref": int(theirs.memory_bank.bank_ptr), "z2": b.detach()})
        # No bank: lightly 1.6's gathered NT-Xent (its GatherLayer sums gradients across ranks, as ours does).
        a, b = (torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        a2, b2 = (x.detach().clone().requires_grad_() for x in (a, b))
        ours = simclr_ext.NTXentLoss(temperature=0.2, gather_distributed=True)(a, b)
        ref_loss = lightly_loss.NTXentLoss(temperature=0.2, gather_distributed=True)(a2, b2)
        ours.backward()
        ref_loss.backward()
        out["lightly_gather"] = {"ours": ours.detach(), "theirs": ref_loss.detach(), "g": (a.grad, b.grad),
                                 "g_ref": (a2.grad, b2.grad)}
        out["capacity"] = dict(sd._CAPACITY)
    finally:
        torch.save(out, os.path.join(out_dir, f"gather{rank}.pt"))
        dist.destroy_process_group()


def test_gather_collectives_shape_checks_and_distributed_bank(tmp_path):
    pytest.importorskip("lightly.loss", reason="lightly is installed by requirements-dev.txt")
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"gather{r}.pt") for r in range(WORLD)]
    for r in ranks:
        # Forward: one gather, the shapes inside its message (a header-only gather on the first call, and a
        # second gather when the batch outgrows every earlier one); backward: one reduce-scatter, no all-reduce.
        once = ["gather", "reduce_scatter"]
        assert r["calls"] == [["gather"] + once, once, once, ["gather"] + once, once, once], r["calls"]
        # Different batch sizes on the ranks, after shapes that agreed (the divergent case is the dangerous
        # one: each rank has seen one of the shapes before): the same ValueError on every rank.
        assert "every rank must hold the same batch size" in r["mismatch"]
        assert "rank 0: rows=6, D=5, dtype=torch.float32; rank 1: rows=8, D=5" in r["mismatch"], r["mismatch"]
    for r in ranks:
        got = r["lightly_gather"]
        torch.testing.assert_close(got["ours"], got["theirs"], rtol=1e-12, atol=1e-12)
        for x, y in zip(got["g"], got["g_ref"]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for step in range(3):
        per_rank = [r["bank_steps"][step] for r in ranks]
        for got in per_rank:
            torch.testing.assert_close(got["ours"], got["theirs"], rtol=2e-5, atol=2e-6)
            for x, y in zip(got["g"], got["g_ref"]):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(got["bank"], got["bank_ref"], rtol=0, atol=1e-7)
            assert got["ptr"] == got["ptr_ref"]
        # Every rank holds the same bank: this step's z2 rows of rank 0 then rank 1, normalized.
        torch.testing.assert_close(per_rank[0]["bank"], per_rank[1]["bank"], rtol=0, atol=0)
        rows = torch.nn.functional.normalize(torch.cat([got["z2"] for got in per_rank]), dim=1)
        start = (0, 6, 0)[step]  # 6 rows per step into 10: the second fills the end and drops 2 (lightly's rule)
        take = min(6, 10 - start)
        torch.testing.assert_close(per_rank[0]["bank"][start:start + take], rows[:take])
