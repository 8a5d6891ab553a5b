"""SigLipLoss (every dist_impl) and ClipLoss (every local_loss / gather_with_grad flag) across 2 and 3 gloo ranks
against open_clip's own losses run in the same processes: each rank's loss and its gradients (features,
logit_scale, logit_bias) equal open_clip's, in float64; with labels, SigLipLoss's and ClipLoss's cross-rank
positives equal the float64 oracle of the global batch."""
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simclr_ext
import simclr_reference as ref

open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip_torch is installed by requirements-dev.txt")

N, D = 4, 6  # per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed, world):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(world * N, D, generator=g, dtype=torch.float64) / D ** 0.5
    text = torch.randn(world * N, D, generator=g, dtype=torch.float64) / D ** 0.5
    labels = torch.randint(0, 3, (world * N,), generator=g)
    return image, text, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64), labels


def _run(loss_fn, image, text, scale, bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = loss_fn(*leaves, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


def _worker(rank, world, port, seed, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        image, text, scale, bias, labels = _inputs(seed, world)
        rows = slice(rank * N, (rank + 1) * N)
        mine = image[rows], text[rows], scale, bias
        results = {}
        for impl in ("bidir", "shift", "reduce", "gather"):
            args = dict(rank=rank, world_size=world, dist_impl=impl)
            results[f"siglip_{impl}"] = (_run(simclr_ext.SigLipLoss(**args), *mine),
                                         _run(open_clip_loss.SigLipLoss(**args), *mine))
            results[f"siglip_labels_{impl}"] = _run(simclr_ext.SigLipLoss(**args), *mine,
                                                    labels=labels[rows])
        for local, with_grad in itertools.product((False, True), repeat=2):
            args = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world)
            results[f"clip_{local}_{with_grad}"] = (_run(simclr_ext.ClipLoss(**args), *mine),
                                                   _run(open_clip_loss.ClipLoss(**args), *mine))
            results[f"clip_labels_{local}"] = _run(simclr_ext.ClipLoss(**args), *mine, labels=labels[rows])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _close(a, b, what):
    if a is None or b is None:  # open_clip's ClipLoss leaves logit_bias out of its graph: ours adds 0 * bias
        assert a is None or torch.equal(a, torch.zeros_like(a)), what
        return
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_and_clip_equal_open_clip_across_ranks(world, tmp_path):
    seed = int(torch.randint(1 << 30, ()).item())
    mp.spawn(_worker, args=(world, _free_port(), seed, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    names = ("image", "text", "logit_scale", "logit_bias")
    for rank, results in enumerate(ranks):
        for key, value in results.items():
            if key.startswith(("siglip_labels", "clip_labels")):
                continue
            (loss, grads), (their_loss, their_grads) = value
            _close(loss, their_loss, f"rank {rank} {key} loss")
            for name, g, h in zip(names, grads, their_grads):
                _close(g, h, f"rank {rank} {key} grad of {name}")
    # Labels: the ranks' losses sum to the oracle's global sum of pair losses (each rank's rows over all texts).
    image, text, scale, bias, labels = _inputs(seed, world)
    rows = [ref.siglip_loss(image[r * N:(r + 1) * N], text, scale, bias, labels[r * N:(r + 1) * N], labels)
            for r in range(world)]
    for impl in ("bidir", "shift", "reduce", "gather"):
        for r in range(world):
            _close(ranks[r][f"siglip_labels_{impl}"][0], rows[r], f"rank {r} labels {impl}")

    # ClipLoss with labels: local_loss, each rank's rows against every rank's other side; else the global batch.
    t = 1 / scale
    for r in range(world):
        img, txt, lab = image[r * N:(r + 1) * N], text[r * N:(r + 1) * N], labels[r * N:(r + 1) * N]
        local = (ref.contrastive_loss(img, text, lab, labels, t, normalize=False)
                 + ref.contrastive_loss(txt, image, lab, labels, t, normalize=False)) / 2
        whole = (ref.contrastive_loss(image, text, labels, labels, t, normalize=False)
                 + ref.contrastive_loss(text, image, labels, labels, t, normalize=False)) / 2
        _close(ranks[r]["clip_labels_True"][0], local, f"rank {r} clip labels, local_loss")
        _close(ranks[r]["clip_labels_False"][0], whole, f"rank {r} clip labels, global")
