"""The non-finite step guard: a step whose loss or gradients are NaN/inf is skipped (no optimizer step, its
BatchNorm statistics undone), counted in metrics.jsonl with one warning line, and the run stops with
NonFiniteLossError after max_nonfinite_steps consecutive ones, its last good checkpoint untouched."""
import copy
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr_ext.recipe import cli
from simclr_ext.recipe.train import NonFiniteLossError, PretrainConfig, Trainer

# 1007 digits / 256 = 3 steps per epoch; a 4-wide CNN keeps every run to a few seconds.
TINY = dict(epochs=2, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False,
            device="cpu", warmup_epochs=1)
STEPS_PER_EPOCH = 3


class _NanGrad(torch.autograd.Function):
    """The identity whose backward returns NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _corrupt(trainer, plan):
    """plan: {global step (1-based): "loss" | "grad"}; the criterion's output (or its gradient) turns NaN there."""
    criterion, calls = trainer.criterion, [0]

    def hooked(z1, z2):
        calls[0] += 1
        kind = plan.get(calls[0])
        if kind == "grad":
            z1 = _NanGrad.apply(z1)
        loss = criterion(z1, z2)
        return loss * float("nan") if kind == "loss" else loss

    trainer.criterion = hooked


def _snapshot(trainer):
    return {"model": copy.deepcopy(trainer.model.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"])}


def _same_tensors(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"kind"' not in line]


def _warnings(text):
    return [line for line in text.splitlines() if "step skipped" in line]


def test_nonfinite_steps_are_skipped_counted_and_leave_no_trace(tmp_path, capfd):
    trainer = Trainer(PretrainConfig(out=str(tmp_path), **TINY))
    _corrupt(trainer, {2: "loss", 4: "grad"})  # never two in a row: the run goes on
    states, real_step = [], trainer._train_step

    def recording(images):
        before = _snapshot(trainer)
        result = real_step(images)
        states.append((before, _snapshot(trainer), result[1]))
        return result

    trainer._train_step = recording
    trainer.run()
    assert [finite for _, _, finite in states] == [True, False, True, False, True, True]
    for step, (before, after, finite) in enumerate(states, 1):
        # a skipped step changes no weight, BatchNorm statistic or optimizer moment; a finite one does
        assert _same_tensors(before, after) != finite, f"step {step}"

    rows = _rows(tmp_path)
    assert [r["skipped"] for r in rows] == [False, True, False, True, False, False]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 2, 2, 2]
    assert rows[1]["loss"] is None and math.isfinite(rows[3]["loss"])  # NaN loss, then NaN gradients
    # the schedule follows the position in the run: the logged lr is the one of an unskipped run
    base = trainer.cfg.lr
    for i, row in enumerate(rows):
        assert row["lr"] == pytest.approx(base * trainer.scheduler.lr_lambdas[0](i + 1))

    lines = _warnings(capfd.readouterr().err)
    assert len(lines) == 2
    assert "loss nan at epoch 1, step 2 (global step 2)" in lines[0]
    assert "non-finite gradients at epoch 2, step 1 (global step 4)" in lines[1]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["nonfinite_steps"] == 2 and state["nonfinite_streak"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("limit", [3, 2])
def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, capfd, limit):
    trainer = Trainer(PretrainConfig(out=str(tmp_path), max_nonfinite_steps=limit, **TINY))
    _corrupt(trainer, {s: "loss" for s in range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)})
    last = STEPS_PER_EPOCH + limit
    with pytest.raises(NonFiniteLossError, match=rf"in {limit} consecutive steps \(--max-nonfinite-steps {limit}\), "
                                                 rf"the last at epoch 2, step {limit} \(global step {last}\) with loss "
                                                 r"nan; stopped without saving.*last good checkpoint.*--lr"):
        trainer.run()
    assert len(_warnings(capfd.readouterr().err)) == limit
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, last + 1))  # the stopping step is logged too
    assert [r["skipped"] for r in rows] == [False] * STEPS_PER_EPOCH + [True] * limit
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # written at the end of epoch 1, not after
    assert state["global_step"] == STEPS_PER_EPOCH and state["nonfinite_steps"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    trainer = Trainer(PretrainConfig(out=str(tmp_path), **TINY))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"parameters became non-finite \(encoder\.\S+\) by global step 0"):
        trainer.save()
    assert not os.path.exists(tmp_path / "last.pt")


def test_cli_huge_lr_stops_with_exit_1_and_the_message(tmp_path, capfd):
    """A learning rate of 1e30 overflows the weights within a few steps: the run stops with status 1 and one
    clear line, and whatever checkpoint it left holds finite weights."""
    code = cli.main(["pretrain", "--out", str(tmp_path), "--lr", "1e30", "--epochs", "2", "--batch-size", "256",
                     "--width", "4", "--proj-dim", "16", "--knn-every", "0", "--no-progress", "--device", "cpu",
                     "--no-eval", "--max-nonfinite-steps", "2"])
    err = capfd.readouterr().err
    assert code == 1, err
    assert "simclr-ext pretrain: " in err and "stopped without saving" in err
    if os.path.exists(tmp_path / "last.pt"):
        state = torch.load(tmp_path / "last.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_max_nonfinite_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1, got 0"):
        Trainer(PretrainConfig(out=str(tmp_path), max_nonfinite_steps=0, **TINY))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nan_on_one_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trainer = Trainer(PretrainConfig(out=out_dir, **{**TINY, "epochs": 1}))
        if rank == 1:
            _corrupt(trainer, {2: "loss"})  # only rank 1 sees the NaN
        finite, real_step = [], trainer._train_step

        def recording(images):
            result = real_step(images)
            finite.append(result[1])
            return result

        trainer._train_step = recording
        trainer.run()
        # the parameters (BatchNorm buffers differ by design: each rank updates them with its own last batch)
        weights = {name: p.detach() for name, p in trainer.model.named_parameters()}
        torch.save({"finite": finite, "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The decision is collective: rank 0's loss is finite, yet it skips the step with rank 1, and both ranks
    keep the same weights."""
    mp.spawn(_nan_on_one_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["finite"] == ranks[1]["finite"] == [True, False, True]
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name
    assert [r["skipped"] for r in _rows(tmp_path)] == [False, True, False]
