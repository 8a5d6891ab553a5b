"""Pretraining under torch.distributed on the CPU (2 gloo ranks): each rank trains on its own disjoint
shard of every global batch, every rank takes part in the kNN monitor and the final evaluation, and the
evaluation equals a single process evaluating the same checkpoint."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TINY = dict(epochs=1, batch_size=256, width=4, proj_dim=16, knn_every=1, eval=True, fewshot_draws=1,
            progress=False, device="cpu", warmup_epochs=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    from simclr_ext.recipe.train import PretrainConfig, Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        trainer = Trainer(PretrainConfig(out=out_dir, **TINY))
        seen = []
        real = trainer._train_step

        def recording(images):
            seen.append(images.clone())
            return real(images)

        trainer._train_step = recording
        summary = trainer.run()
        scores = {k: v for k, v in summary.items() if isinstance(v, float) and k != "wall_seconds"}
        torch.save({"summary": scores, "images": seen},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_pretraining_shards_batches_and_evaluates_like_one_process(tmp_path):
    from simclr_ext.recipe.data import load_dataset
    from simclr_ext.recipe.train import knn_eval, linear_eval

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # the same global batches as one process would draw, split into two disjoint halves
    order = torch.randperm(1007, generator=torch.Generator().manual_seed(0))
    pretrain = load_dataset("digits").pretrain.images
    steps = 1007 // 256
    assert [len(r["images"]) for r in ranks] == [steps, steps]
    for step in range(steps):
        expected = pretrain[order[step * 256:(step + 1) * 256]]
        assert torch.equal(torch.cat([ranks[0]["images"][step], ranks[1]["images"][step]]), expected)
    # every rank computed the evaluation together and got the same numbers
    assert ranks[0]["summary"] == ranks[1]["summary"]
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["linear_top1"] == ranks[0]["summary"]["linear_top1"]
    # one process evaluating the checkpoint the two ranks wrote agrees (up to one image of 540)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert linear_eval(str(tmp_path / "last.pt"))["top1"] == pytest.approx(saved["linear_top1"], abs=1.01 / 540)
        assert knn_eval(str(tmp_path / "last.pt")) == pytest.approx(saved["knn_top1"], abs=1.01 / 540)
    finally:
        torch.set_num_threads(threads)
    epoch = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"kind": "epoch"' in l]
    assert epoch[0]["knn_top1"] == pytest.approx(saved["validation_knn_top1"])  # the monitor ran on both ranks


def _pretrain_worker(rank, port, out_dir):
    from simclr_ext.recipe.train import pretrain

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
