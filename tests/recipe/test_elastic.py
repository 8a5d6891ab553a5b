"""Elastic restart under torchrun (2 gloo ranks on the CPU, --max-restarts=2): a rank killed by SIGKILL
mid-epoch, or rank 0 killed halfway through writing a checkpoint. The agent restarts the group, which resumes
by itself from the last complete checkpoint (no --resume), and the run ends with the same checkpoint, bit for
bit, as an uninterrupted run, every metrics row once and TensorBoard purged of the steps after the checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
WORKER = os.path.join(ROOT, "tests", "recipe", "elastic_worker.py")
# 1007 digits / 32 = 31 steps per epoch, 93 in all; a 4-wide CNN: a few seconds of training.
STEPS_PER_EPOCH, EPOCHS = 31, 3
ARGS = ["pretrain", "--epochs", str(EPOCHS), "--batch-size", "32", "--width", "4", "--proj-dim", "16",
        "--knn-every", "0", "--no-progress", "--device", "cpu", "--no-eval", "--warmup-epochs", "1"]
TIMEOUT = 300

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")


def _torchrun(out, log, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=2", "--monitor-interval=0.2", WORKER, *ARGS, "--out", str(out)]
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, log_path):
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(log_path).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def _rows(out):
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written while the test polls
                pass
    return rows


def _tensorboard_points(out):
    """What TensorBoard shows: every writer's events, those at or after a later writer's purge_step dropped."""
    points = []
    with open(os.path.join(out, "tb", "events.jsonl")) as f:
        for row in map(json.loads, f):
            if "purge_step" in row:
                if row["purge_step"] is not None:
                    points = [p for p in points if p[1] < row["purge_step"]]
            else:
                points.append((row["tag"], row["step"], row["value"]))
    return sorted(points, key=lambda p: (p[1], p[0]))


def _descendants(pid):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _worker_of_rank(agent_pid, rank):
    for pid in _descendants(agent_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    with open(out / "torchrun.log", "w") as log:
        proc = _torchrun(out / "run", log)
    _finish(proc, out / "torchrun.log")
    return out / "run"


def _assert_same_run(out, reference, resumed_at):
    state = torch.load(out / "last.pt", weights_only=True)
    expected = torch.load(reference / "last.pt", weights_only=True)
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name  # bit for bit
    for index, moments in expected["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(state["optimizer"]["state"][index][key], tensor), (index, key)
    rows, expected_rows = _rows(out), _rows(reference)
    steps = [r["step"] for r in rows if "kind" not in r]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # every step once
    assert [r["loss"] for r in rows if "kind" not in r] == [r["loss"] for r in expected_rows if "kind" not in r]
    assert [r["epoch"] for r in rows if r.get("kind") == "epoch"] == list(range(1, EPOCHS + 1))
    points = _tensorboard_points(out)
    assert [p[:2] for p in points] == [p[:2] for p in _tensorboard_points(reference)]
    assert len({p[:2] for p in points}) == len(points)  # no step twice
    events = [json.loads(line) for line in open(out / "tb" / "events.jsonl") if "purge_step" in line]
    assert [e["purge_step"] for e in events] == [None, resumed_at + 1]
    assert [name for name in os.listdir(out) if name.startswith(".tmp-")] == []


def test_a_rank_killed_mid_epoch_is_restarted_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = _torchrun(out, log)
    killed, deadline = None, time.time() + TIMEOUT
    try:
        # kill rank 1 once epoch 2 is under way (the checkpoint of epoch 1 exists)
        while killed is None and proc.poll() is None and time.time() < deadline:
            steps = [r["step"] for r in _rows(out) if "kind" not in r] if (out / "metrics.jsonl").exists() else []
            if (out / "last.pt").exists() and steps and steps[-1] >= STEPS_PER_EPOCH + 2:
                killed = _worker_of_rank(proc.pid, 1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
    finally:
        text = _finish(proc, tmp_path / "torchrun.log")
    assert killed is not None, "the run ended before rank 1 could be killed"
    resumed = [line for line in text.splitlines() if "simclr-ext: elastic restart 1: resumed from" in line]
    assert len(resumed) == 1, text[-4000:]
    resumed_at = int(resumed[0].rsplit("global step ", 1)[1])
    assert resumed_at in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)  # the kill landed before the run's end
    _assert_same_run(out, uninterrupted, resumed_at)


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted):
    """Rank 0 dies halfway through writing the checkpoint of epoch 2: last.pt still holds epoch 1's, which the
    restarted group loads (the half-written temporary file is never loaded, and is removed)."""
    out = tmp_path / "run"
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = _torchrun(out, log, SIMCLR_EXT_TEST_KILL_IN_SAVE="2")
    text = _finish(proc, tmp_path / "torchrun.log")
    assert f"simclr-ext: elastic restart 1: resumed from {str(out / 'last.pt')!r} at global step " \
           f"{STEPS_PER_EPOCH}" in text, text[-4000:]
    _assert_same_run(out, uninterrupted, STEPS_PER_EPOCH)


# ----- the restart decision, in one process (no torchrun): which checkpoint a restarted worker picks up -----
TINY = dict(epochs=1, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False, device="cpu",
            warmup_epochs=1)


def test_a_restart_resumes_only_from_its_own_jobs_checkpoint(tmp_path, monkeypatch):
    from simclr_ext.recipe.train import PretrainConfig, RunDirectoryError, Trainer

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    Trainer(PretrainConfig(out=str(tmp_path), **TINY)).run()  # job a's checkpoint, after its 3 steps
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = Trainer(PretrainConfig(out=str(tmp_path), **TINY))
    assert restarted.cfg.resume and restarted.global_step == 3
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job finds a's checkpoint: the usual rule
    with pytest.raises(RunDirectoryError, match="--resume"):
        Trainer(PretrainConfig(out=str(tmp_path), **TINY))


def test_a_restart_before_any_checkpoint_starts_over_without_the_old_events(tmp_path, monkeypatch):
    from simclr_ext.recipe.train import PretrainConfig, Trainer

    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_text("the failed attempt's events")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 1.0, "lr": 0.1}\n')
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trainer = Trainer(PretrainConfig(out=str(tmp_path), **TINY))
    assert not trainer.cfg.resume and not (tmp_path / "tb" / "events.out.tfevents.1").exists()
    trainer.run()
    assert [r["step"] for r in _rows(tmp_path) if "kind" not in r] == [1, 2, 3]
