"""Datasets and the evaluation transform (the augmentation is SimCLRAugment: tests/test_augment*.py)."""
import numpy as np
import pytest
import torch

from simclr_ext import data


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = data.load_dataset("digits"), data.load_dataset("digits", seed=5)
    assert len(a.pretrain) == 1257 and len(a.test) == 540
    assert torch.equal(a.test.images, b.test.images)  # the split does not follow the run's seed
    assert a.pretrain.images.dtype == torch.uint8 and a.pretrain.images.shape[1:] == (1, 8, 8)
    assert int(a.pretrain.images.max()) == 255
    counts = torch.bincount(a.test.labels, minlength=10).double() / len(a.test)
    assert (counts - 0.1).abs().max() < 0.015
    train_rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(a.train.images, a.train.labels)}
    assert sum((tuple(x.flatten().tolist()) + (int(y),)) in train_rows for x, y in zip(a.test.images, a.test.labels)) < 5


def test_missing_torchvision_dataset_names_the_path(tmp_path):
    with pytest.raises(data.DataNotFoundError, match=str(tmp_path / "nowhere")):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError, match="--download"):
        data.load_dataset("mnist", data_dir=str(empty))
    with pytest.raises(data.DataNotFoundError, match="train/ and val/"):
        data.load_dataset("imagefolder", data_dir=str(empty))
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet-21k")


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                h, w = rng.integers(20, 50, size=2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    s = data.load_dataset("imagefolder", data_dir=str(tmp_path), image_size=16)
    assert s.num_classes == 2 and len(s.pretrain) == 6 and len(s.test) == 6
    batches = list(s.pretrain.batches(torch.arange(6), 4))
    assert [b[0].shape for b in batches] == [(4, 3, 19, 19), (2, 3, 19, 19)]  # 16 * 8 / 7, rounded up
    assert batches[0][0].dtype == torch.uint8 and batches[0][1].tolist() == [0, 0, 0, 1]


def test_eval_transform_normalizes_and_resizes():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    y = data.eval_transform(x, 16, (0.5,), (0.25,))
    assert y.shape == (2, 1, 16, 16) and torch.allclose(y, torch.full_like(y, 2.0))
