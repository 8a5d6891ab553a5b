"""The trainer: exact resume after an interruption (Ctrl-C and SIGKILL), NaN handling, safe checkpoints,
the run directory, and what a run writes."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from simclr_ext.recipe.checkpoint import CheckpointError, read_checkpoint
from simclr_ext.recipe.train import (
    NonFiniteLossError,
    PretrainConfig,
    RunDirectoryError,
    Trainer,
    pretrain,
    save_checkpoint_atomic,
)

# 1007 digits / 256 = 3 steps per epoch; a 4-wide CNN keeps every run to a few seconds.
TINY = dict(epochs=2, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False,
            device="cpu", warmup_epochs=1)
STEPS_PER_EPOCH = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _config(out, **kw):
    return PretrainConfig(out=str(out), **{**TINY, **kw})


class _Hook:
    """Wraps the criterion to act at one global step (1-based); records the inputs it saw."""

    def __init__(self, criterion, at_step, action):
        self.criterion, self.at_step, self.action, self.calls, self.seen = criterion, at_step, action, 0, []

    def __call__(self, z1, z2):
        self.calls += 1
        self.seen.append((tuple(z1.shape), z1.dtype))
        loss = self.criterion(z1, z2)
        if self.calls == self.at_step:
            loss = self.action(loss)
        return loss


def _sigint(loss):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arriving in the middle of a step
    return loss


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _step_losses(out):
    return [r["loss"] for r in _rows(out) if "kind" not in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(_config(out))
    trainer.run()
    return trainer, _step_losses(out)


@pytest.mark.parametrize("stop_at", [2, 3, 5])  # mid-epoch 1, the end of epoch 1, mid-epoch 2
def test_interrupt_then_resume_reproduces_the_losses_exactly(tmp_path, uninterrupted, stop_at):
    full_trainer, full_losses = uninterrupted
    assert len(full_losses) == 2 * STEPS_PER_EPOCH
    first = Trainer(_config(tmp_path))
    first.criterion = _Hook(first.criterion, stop_at, _sigint)
    with pytest.raises(KeyboardInterrupt, match="checkpoint written"):
        first.run()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["global_step"] == stop_at  # the interrupted step finished, then the checkpoint was written
    assert _step_losses(tmp_path) == full_losses[:stop_at]

    resumed = Trainer(_config(tmp_path, resume=True))
    resumed.run()
    assert _step_losses(tmp_path) == full_losses  # every digit
    for a, b in zip(full_trainer.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from simclr_ext.recipe.train import PretrainConfig, Trainer
    kw = dict(epochs=2, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False,
              device="cpu", warmup_epochs=1)
    trainer = Trainer(PretrainConfig(out=sys.argv[1], **kw))
    crit, calls = trainer.criterion, [0]
    def killing(z1, z2):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no checkpoint: the process just dies
        return crit(z1, z2)
    trainer.criterion = killing
    trainer.run()
""")


def test_sigkill_then_resume_logs_every_step_once(tmp_path, uninterrupted):
    """Killed in step 5 (the checkpoint is from the end of epoch 1, step 3): metrics.jsonl then holds
    step 4, which the resumed run computes again; it must appear once, as must every TensorBoard point."""
    _, full_losses = uninterrupted
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), "5"], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [r["step"] for r in _rows(tmp_path) if "kind" not in r] == [1, 2, 3, 4]
    assert read_checkpoint(str(tmp_path / "last.pt"))["global_step"] == 3

    Trainer(_config(tmp_path, resume=True)).run()
    rows = _rows(tmp_path)
    steps = [r["step"] for r in rows if "kind" not in r]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # no duplicates
    assert _step_losses(tmp_path) == full_losses
    assert [r["epoch"] for r in rows if r.get("kind") == "epoch"] == [1, 2]


def test_resumed_tensorboard_purges_the_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """TensorBoard (optional) is told to drop its events from the step after the checkpoint on."""
    import types

    from simclr_ext.recipe.metrics import MetricsLog

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)
            self.points = []

        def add_scalar(self, tag, value, step):
            self.points.append((tag, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    fresh = MetricsLog(str(tmp_path))
    for step in (1, 2, 3, 4):
        fresh.write(epoch=1, step=step, loss=1.0, lr=0.1)
    fresh.close()
    resumed = MetricsLog(str(tmp_path), resume_step=2, resume_epoch=0)
    resumed.write(epoch=1, step=3, loss=1.0, lr=0.1)
    resumed.close()
    assert made == [None, 3]
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


def test_nan_loss_stops_and_resume_may_lower_the_lr(tmp_path):
    trainer = Trainer(_config(tmp_path, max_nonfinite_steps=1))  # stop at the first (see test_nonfinite.py)
    trainer.criterion = _Hook(trainer.criterion, STEPS_PER_EPOCH + 2, lambda loss: loss * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"in a step .*at epoch 2, step 2 .*loss nan.*last good checkpoint"
                                                 r".*--resume"):
        trainer.run()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    # follow the advice: a lower lr and a larger temperature on resume
    old_lr = trainer.optimizer.param_groups[0]["lr"]
    resumed = Trainer(_config(tmp_path, resume=True, lr=trainer.cfg.lr / 4, temperature=0.7))
    lr_now = resumed.optimizer.param_groups[0]["lr"]
    assert lr_now == pytest.approx(resumed.scheduler.lr_lambdas[0](STEPS_PER_EPOCH) * trainer.cfg.lr / 4)
    assert resumed.criterion.temperature == 0.7 and lr_now < old_lr
    resumed.run()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["lr"] == trainer.cfg.lr / 4
    assert state["departures"] == [{"step": STEPS_PER_EPOCH, "changes": {"lr": [trainer.cfg.lr, trainer.cfg.lr / 4],
                                                                          "temperature": [0.5, 0.7]}}]
    departure = [r for r in _rows(tmp_path) if r.get("kind") == "departure"]
    assert departure == [{"kind": "departure", "step": STEPS_PER_EPOCH,
                          "changes": {"lr": [trainer.cfg.lr, trainer.cfg.lr / 4], "temperature": [0.5, 0.7]}}]
    # the lr of the logged steps after the departure follows the new base lr
    lrs = [r["lr"] for r in _rows(tmp_path) if "kind" not in r]
    # (a step row logs the lr after its scheduler step, the lr of the next step)
    assert lrs[STEPS_PER_EPOCH] == pytest.approx(resumed.scheduler.lr_lambdas[0](STEPS_PER_EPOCH + 1)
                                                 * trainer.cfg.lr / 4)


def test_atomic_save_leaves_the_old_checkpoint_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint_atomic({"x": torch.arange(3)}, str(path))
    # A lambda does not pickle (AttributeError or PicklingError, depending on the Python version).
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint_atomic({"x": torch.zeros(3), "bad": lambda: 0}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_checkpoint_loads_with_weights_only(uninterrupted):
    trainer, _ = uninterrupted
    state = torch.load(os.path.join(trainer.out, "last.pt"), weights_only=True)  # no pickled code needed
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "global_step", "config"):
        assert key in state
    assert set(state["rng"]) == {"torch", "numpy", "python", "cuda", "augment", "data_order"}
    assert (isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
            and isinstance(state["rng"]["python"]["state"], torch.Tensor))
    assert state["config"]["arch"] == "small_cnn" and state["config"]["image_size"] == 16
    assert "effective_lr" not in state


def test_rng_states_round_trip():
    import random

    import numpy as np

    from simclr_ext.recipe.checkpoint import pack_rng, unpack_rng

    random.gauss(0, 1)  # a cached gaussian in Python's state
    packed = pack_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    torch.rand(5), np.random.rand(5), random.random()
    unpack_rng(packed)
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_damaged_and_foreign_checkpoints_give_one_line(tmp_path, uninterrupted):
    trainer, _ = uninterrupted
    good = open(os.path.join(trainer.out, "last.pt"), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch file") as e:
        read_checkpoint(str(truncated))
    assert str(truncated) in str(e.value) and "\n" not in str(e.value)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "simclr_ext.pretrain/1", "obj": _Hook(None, 0, None)}, pickled)  # needs unpickling code
    with pytest.raises(CheckpointError, match="safe loading"):
        read_checkpoint(str(pickled))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a simclr_ext.pretrain/1 checkpoint"):
        read_checkpoint(str(foreign))
    # resuming from a damaged last.pt: the same one-line error, not a traceback
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(good[:1000])
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(_config(run, resume=True))


def test_existing_run_directory_needs_resume_or_overwrite(tmp_path, uninterrupted):
    trainer, full_losses = uninterrupted
    with pytest.raises(RunDirectoryError, match="--resume.*--overwrite"):
        Trainer(_config(trainer.out))
    assert _step_losses(trainer.out) == full_losses  # untouched
    out = tmp_path / "again"
    Trainer(_config(out, epochs=1)).run()
    Trainer(_config(out, epochs=1, overwrite=True)).run()
    assert len(_step_losses(out)) == STEPS_PER_EPOCH and read_checkpoint(str(out / "last.pt"))["epoch"] == 1
    with pytest.raises(ValueError, match="exclude each other"):
        Trainer(_config(out, resume=True, overwrite=True))


def test_resume_refuses_changed_settings(tmp_path, uninterrupted):
    trainer, _ = uninterrupted
    with pytest.raises(ValueError, match="weight_decay: checkpoint 1e-05 vs now 0.001"):
        Trainer(_config(trainer.out, resume=True, weight_decay=1e-3))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_config(tmp_path, resume=True))


def test_summary_reports_validation_and_test(tmp_path):
    summary = pretrain(_config(tmp_path, epochs=1, eval=True, knn_every=1, fewshot_draws=2))
    saved = json.load(open(tmp_path / "summary.json"))
    for split in ("", "validation_"):
        for key in ("linear_top1", "knn_top1", "fewshot_top1"):
            for prefix in ("", "random_init_"):
                name = prefix + split + key
                assert 0.0 <= saved[name] <= 1.0 and saved[name] == summary[name]
    assert saved["validation_images"] == 250 and saved["test_images"] == 540
    assert saved["random_init_linear_top1"] > 0.5  # digits are nearly linearly separable even at random init
    assert saved["wall_seconds"] > 0
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    epochs = [r for r in _rows(tmp_path) if r.get("kind") == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["knn_top1"] <= 1 and epochs[0]["images_per_s"] > 0
    # the kNN monitor reads the validation split (tuning never sees the test split)
    assert epochs[0]["knn_top1"] == pytest.approx(saved["validation_knn_top1"])


def test_missing_matplotlib_keeps_the_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        summary = pretrain(_config(tmp_path, epochs=1, eval=True, fewshot_draws=1))
    assert json.load(open(tmp_path / "summary.json"))["linear_top1"] == summary["linear_top1"]
    assert not (tmp_path / "training_curve.png").exists()


def test_missing_training_dependency_is_named_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    from simclr_ext.recipe.train import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"scikit-learn \(for the digits dataset\).*simclr_ext\[train\]"):
        Trainer(_config(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_is_one_line_per_epoch_without_a_tty(tmp_path, capsys):
    pretrain(_config(tmp_path, epochs=3, progress=True))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "\r" not in err and "it/s" not in err


def test_no_eval_skips_evaluation_and_restores_threads(tmp_path):
    before = torch.get_num_threads()
    summary = pretrain(_config(tmp_path, epochs=1, threads=1))
    assert "linear_top1" not in summary and summary["wall_seconds"] > 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=4096), "larger than the digits pretraining set"),
    (dict(precision="fp16"), "needs a CUDA device"),
    (dict(batch_size=250, accum_steps=3), "divisible by accum_steps"),
    (dict(dataset="svhn"), "dataset must be one of"),
    (dict(recipe="imagenet21k"), "recipe must be one of"),
])
def test_bad_config_raises(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_config(tmp_path, **kw))


def test_bf16_autocast_and_accumulation_take_effect(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=1, precision="bf16", accum_steps=2, optimizer="lars", lr=0.5,
                              lr_scaling="linear"))
    hook = _Hook(trainer.criterion, 0, None)
    trainer.criterion = hook
    projections = []
    trainer.model.head.register_forward_hook(lambda mod, inp, out: projections.append(out.dtype))
    steps = []
    trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    trainer.run()
    # two micro-batches of 128 per optimizer step, the head's output computed in bfloat16
    assert len(hook.seen) == 2 * STEPS_PER_EPOCH and all(shape == (128, 16) for shape, _ in hook.seen)
    assert len(steps) == STEPS_PER_EPOCH and set(projections) == {torch.bfloat16}
    assert len(trainer.step_losses) == STEPS_PER_EPOCH and all(0 < l < 10 for l in trainer.step_losses)


def test_recipes_fill_unset_fields():
    from simclr_ext.recipe.recipes import RECIPES

    small = PretrainConfig().resolved()
    assert (small.arch, small.optimizer, small.width, small.threads, small.epochs) == ("small_cnn", "adamw", 32, 1, 100)
    assert (small.pool, small.final_relu, small.augment) == (1, False, None)  # augment: the dataset's preset
    c10 = PretrainConfig(dataset="cifar10").resolved()
    assert (c10.arch, c10.optimizer, c10.lr, c10.lr_scaling, c10.batch_size, c10.weight_decay, c10.temperature,
            c10.epochs, c10.cifar_stem) == ("resnet18", "lars", 1.0, "linear", 512, 1e-4, 0.5, 1000, True)
    assert PretrainConfig(dataset="cifar100").resolved().lr == 1.0
    inet = PretrainConfig(dataset="imagefolder").resolved()
    assert (inet.arch, inet.batch_size, inet.lr, inet.lr_scaling, inet.weight_decay, inet.temperature, inet.cifar_stem,
            inet.epochs) == ("resnet50", 4096, 0.3, "linear", 1e-6, 0.1, False, 100)
    small_machine = PretrainConfig(dataset="imagefolder", recipe="imagenet_small").resolved()
    assert (small_machine.lr, small_machine.lr_scaling, small_machine.batch_size) == (0.075, "sqrt", 256)
    assert PretrainConfig(dataset="stl10").resolved().cifar_stem is False
    assert PretrainConfig(dataset="cifar10", lr=0.5).resolved().lr == 0.5  # given fields win
    assert (c10.pool, c10.final_relu) == (2, True)  # the ResNets ignore them; filled for the checkpoint
    for name, recipe in RECIPES.items():
        PretrainConfig(dataset="cifar10", recipe=name).resolved()  # every recipe resolves to a valid config
        assert {"arch", "batch_size", "optimizer", "lr", "lr_scaling", "weight_decay", "temperature",
                "epochs"} <= set(recipe)


def test_loss_decreases(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=4, width=8))
    trainer.run()
    first, last = trainer.history[0]["loss"], trainer.history[-1]["loss"]
    assert last < first - 0.05


def test_trainer_augments_with_the_fused_simclr_augment(tmp_path):
    from simclr_ext import SimCLRAugment
    from simclr_ext.recipe.train import AUGMENT_RECIPES

    trainer = Trainer(_config(tmp_path))
    aug = trainer.aug
    assert isinstance(aug, SimCLRAugment)
    assert aug.size == (16, 16) and aug.mean == (0.3,) and aug.std == (0.38,)  # the digits split's statistics
    recipe = AUGMENT_RECIPES["digits"]
    assert aug.scale == tuple(recipe["scale"]) and aug.rotation_degrees == recipe["rotation_degrees"]
    assert aug.flip_p == 0 and aug.hue_strength == 0 and aug.blur_p == 0 and aug.grayscale_p == 0
    images = trainer.splits.pretrain.images[:8]
    v1, v2 = aug(images, generator=torch.Generator().manual_seed(1))
    w1, w2 = aug(images, generator=torch.Generator().manual_seed(1))
    assert v1.shape == (8, 1, 16, 16) and v1.dtype == torch.float32
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
    # another preset is taken as it is (no digits overrides), still with the dataset's statistics
    plain = Trainer(_config(tmp_path, augment="mnist")).aug
    assert plain.scale == SimCLRAugment.preset("mnist").scale and plain.mean == (0.3,) and plain.size == (16, 16)


def test_normalization_statistics_live_in_one_place():
    import importlib

    from simclr_ext import stats
    from simclr_ext.recipe import data

    augment = importlib.import_module("simclr_ext.augment")  # the module (simclr_ext.augment is the function)
    assert augment.CIFAR10_MEAN is stats.CIFAR10_MEAN and augment.IMAGENET_STD is stats.IMAGENET_STD
    assert stats.DATASET_STATS["cifar100"] != stats.DATASET_STATS["cifar10"]  # CIFAR-100 has its own
    assert data.load_dataset("digits").mean == stats.DIGITS_MEAN


@pytest.mark.parametrize("kw,match", [(dict(augment="cifar"), "augment must be one of"),
                                      (dict(pool=0), "pool must be >= 1")])
def test_bad_augment_or_pool_names_the_argument(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_config(tmp_path, **kw))


def test_pool_and_final_relu_shape_the_small_cnn(tmp_path):
    from torch import nn

    trainer = Trainer(_config(tmp_path, pool=1, final_relu=False))
    assert trainer.model.encoder.feature_dim == 4 * 4
    assert isinstance(trainer.model.encoder.features[-1], nn.BatchNorm2d)
    trainer = Trainer(_config(tmp_path, pool=2, final_relu=True))
    assert trainer.model.encoder.feature_dim == 4 * 4 * 4
    assert isinstance(trainer.model.encoder.features[-1], nn.ReLU)
