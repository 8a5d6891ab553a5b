"""The trainer: exact resume after an interruption, NaN handling, atomic checkpoints, run outputs."""
import json
import os
import signal

import pytest
import torch

from simclr_ext.train import NonFiniteLossError, PretrainConfig, Trainer, pretrain, save_checkpoint_atomic

# 1257 digits / 256 = 4 steps per epoch; a 4-wide CNN keeps every run to a few seconds.
TINY = dict(epochs=2, batch_size=256, width=4, proj_dim=16, knn_every=0, eval=False, progress=False,
            device="cpu", warmup_epochs=1)


def _config(out, **kw):
    return PretrainConfig(out=str(out), **{**TINY, **kw})


class _Hook:
    """Wraps the criterion to act at one global step (1-based)."""

    def __init__(self, criterion, at_step, action):
        self.criterion, self.at_step, self.action, self.calls = criterion, at_step, action, 0

    def __call__(self, z1, z2):
        self.calls += 1
        loss = self.criterion(z1, z2)
        if self.calls == self.at_step:
            loss = self.action(loss)
        return loss


def _sigint(loss):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arriving in the middle of a step
    return loss


def _step_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "step" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(_config(out))
    trainer.run()
    return trainer, _step_losses(out)


@pytest.mark.parametrize("stop_at", [3, 4, 6])  # mid-epoch 1, the end of epoch 1, mid-epoch 2
def test_interrupt_then_resume_reproduces_the_losses_exactly(tmp_path, uninterrupted, stop_at):
    full_trainer, full_losses = uninterrupted
    assert len(full_losses) == 8
    first = Trainer(_config(tmp_path))
    first.criterion = _Hook(first.criterion, stop_at, _sigint)
    with pytest.raises(KeyboardInterrupt, match="checkpoint written"):
        first.run()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["global_step"] == stop_at  # the interrupted step finished, then the checkpoint was written
    assert _step_losses(tmp_path) == full_losses[:stop_at]

    resumed = Trainer(_config(tmp_path, resume=True))
    resumed.run()
    assert _step_losses(tmp_path) == full_losses  # every digit
    for a, b in zip(full_trainer.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(_config(tmp_path))
    trainer.criterion = _Hook(trainer.criterion, 6, lambda loss: loss * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 2.*last good checkpoint"):
        trainer.run()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    # and it resumes from there
    Trainer(_config(tmp_path, resume=True)).run()
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 2


def test_atomic_save_leaves_the_old_checkpoint_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint_atomic({"x": torch.arange(3)}, str(path))
    with pytest.raises(Exception):
        save_checkpoint_atomic({"x": torch.zeros(3), "bad": lambda: 0}, str(path))  # lambdas do not pickle
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_checkpoint_contents(uninterrupted):
    trainer, _ = uninterrupted
    state = torch.load(os.path.join(trainer.out, "last.pt"), weights_only=False)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "global_step", "config"):
        assert key in state
    assert set(state["rng"]) == {"torch", "numpy", "python", "cuda", "augment", "data_order"}
    assert state["config"]["arch"] == "small_cnn" and state["config"]["image_size"] == 16


def test_resume_refuses_changed_settings(tmp_path, uninterrupted):
    trainer, _ = uninterrupted
    with pytest.raises(ValueError, match="temperature: checkpoint 0.5 vs now 0.2"):
        Trainer(_config(trainer.out, resume=True, temperature=0.2))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_config(tmp_path, resume=True))


def test_summary_and_run_outputs(tmp_path):
    summary = pretrain(_config(tmp_path, epochs=1, eval=True, knn_every=1, fewshot_draws=2))
    saved = json.load(open(tmp_path / "summary.json"))
    for key in ("linear_top1", "knn_top1", "fewshot_top1", "random_init_linear_top1", "random_init_knn_top1",
                "random_init_fewshot_top1"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == summary[key]
    assert saved["random_init_linear_top1"] > 0.5  # digits are nearly linearly separable even at random init
    assert saved["wall_seconds"] > 0
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    epochs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"kind": "epoch"' in l]
    assert len(epochs) == 1 and 0 <= epochs[0]["knn_top1"] <= 1 and epochs[0]["images_per_s"] > 0


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
])
def test_bad_config_raises(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_config(tmp_path, **kw))


def test_bf16_and_accumulation_train(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=1, precision="bf16", accum_steps=2, optimizer="lars", lr=0.5,
                              lr_scaling="linear"))
    trainer.run()
    assert len(trainer.step_losses) == 4 and all(0 < l < 10 for l in trainer.step_losses)


def test_recipes_fill_unset_fields():
    small = PretrainConfig().resolved()
    assert (small.arch, small.optimizer, small.width, small.threads) == ("small_cnn", "adamw", 32, 1)
    assert (small.pool, small.final_relu, small.augment) == (1, False, None)  # augment: the dataset's preset
    paper = PretrainConfig(dataset="cifar10", lr=1.0).resolved()
    assert (paper.arch, paper.optimizer, paper.lr, paper.lr_scaling, paper.cifar_stem) == ("resnet18", "lars", 1.0, "linear", True)
    assert PretrainConfig(dataset="stl10").resolved().cifar_stem is False
    assert (paper.pool, paper.final_relu) == (2, True)  # the ResNets ignore them; filled for the checkpoint


def test_loss_decreases(tmp_path):
    trainer = Trainer(_config(tmp_path, epochs=4, width=8))
    trainer.run()
    first, last = trainer.history[0]["loss"], trainer.history[-1]["loss"]
    assert last < first - 0.05


def test_trainer_augments_with_the_fused_simclr_augment(tmp_path):
    from simclr_ext import SimCLRAugment
    from simclr_ext.train import AUGMENT_RECIPES

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
