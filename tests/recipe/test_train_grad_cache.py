"""`pretrain --grad-cache-chunk K`: the trainer's gradient-cached step. With one chunk per micro-batch it trains
exactly as the uncached step; with smaller chunks the model sees K images (both views) per forward, twice per
chunk, while the loss sees the whole micro-batch; a changed chunk on resume is a logged departure; the CLI flag
end to end."""
import json

import pytest
import torch

from simclr_ext.recipe import cli
from simclr_ext.recipe.train import PretrainConfig, Trainer, pretrain

# 1007 digits / 256 = 3 steps per epoch; a 4-wide CNN keeps every run to a few seconds.
TINY = dict(epochs=1, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False,
            device="cpu", warmup_epochs=1)


def _trainer(out, **kw):
    return Trainer(PretrainConfig(out=str(out), **{**TINY, **kw}))


def _watch(trainer):
    """Records the batch size of every model forward and the shapes the loss receives."""
    forwards, losses = [], []
    trainer.model.register_forward_hook(lambda mod, inp, out: forwards.append(inp[0].shape[0]))
    criterion = trainer.criterion

    def seen(z1, z2):
        losses.append(tuple(z1.shape))
        return criterion(z1, z2)
    trainer.criterion = seen
    return forwards, losses


def test_one_chunk_per_micro_batch_trains_as_uncached(tmp_path):
    plain = _trainer(tmp_path / "plain")
    plain.run()
    cached = _trainer(tmp_path / "cached", grad_cache_chunk=256)
    cached.run()
    torch.testing.assert_close(torch.tensor(cached.step_losses), torch.tensor(plain.step_losses), rtol=1e-5,
                               atol=1e-6)
    for (name, a), b in zip(cached.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("accum,chunk", [(1, 100), (2, 50)])
def test_chunks_feed_the_model_and_the_whole_micro_batch_the_loss(tmp_path, accum, chunk):
    trainer = _trainer(tmp_path, grad_cache_chunk=chunk, accum_steps=accum)
    forwards, losses = _watch(trainer)
    trainer.run()
    micro = 256 // accum
    sizes = [2 * min(chunk, micro - lo) for lo in range(0, micro, chunk)]  # both views of each chunk
    assert losses == [(micro, 16)] * (3 * accum)
    assert forwards == (sizes + sizes) * (3 * accum)  # the graph-free pass, then the pass with a graph
    assert len(trainer.step_losses) == 3 and all(0 < loss < 10 for loss in trainer.step_losses)


def test_changed_chunk_on_resume_is_a_departure(tmp_path):
    pretrain(PretrainConfig(out=str(tmp_path), **TINY))
    summary = pretrain(PretrainConfig(out=str(tmp_path), resume=True, grad_cache_chunk=64, **TINY))
    assert summary["departures"] == [{"step": 3, "changes": {"grad_cache_chunk": [None, 64]}}]


def test_cli_flag_end_to_end(tmp_path, capsys):
    args = ["pretrain", "--epochs", "1", "--batch-size", "256", "--width", "4", "--proj-dim", "16",
            "--knn-every", "0", "--no-progress", "--no-eval", "--device", "cpu"]
    assert cli.main([*args, "--grad-cache-chunk", "96", "--out", str(tmp_path)]) == 0
    assert "final loss" in capsys.readouterr().out
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["config"]["grad_cache_chunk"] == 96 and 0 < summary["final_loss"] < 10
    assert cli.main([*args, "--grad-cache-chunk", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "grad_cache_chunk must be >= 1" in err and err.count("\n") == 1
