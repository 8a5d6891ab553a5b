"""Datasets, the evaluation transform and the batched two-view augmentation."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


def _spec(preset="cifar", size=16):
    return data.augment_spec(preset, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_augment_is_reproducible_and_views_differ():
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    aug = data.make_augment(_spec("imagenet"))
    a1, a2 = aug(images, torch.Generator().manual_seed(3))
    b1, b2 = aug(images, torch.Generator().manual_seed(3))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == (6, 3, 16, 16) and a1.dtype == torch.float32
    assert not torch.equal(a1, a2)
    c1, _ = aug(images, torch.Generator().manual_seed(4))
    assert not torch.equal(a1, c1)


def test_augment_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        data.make_augment(_spec())(torch.rand(2, 3, 8, 8), torch.Generator())


def test_crop_boxes_follow_the_scale_range():
    spec = data.augment_spec("digits", 16, (0.5,), (0.25,))
    boxes = data._crop_boxes(2000, 32, 32, spec, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    area = h * w / (32 * 32)
    assert area.min() >= 0.5 - 0.05 and area.max() <= 1.0
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert ((w / h) >= 0.8 - 0.1).all() and ((w / h) <= 1.25 + 0.1).all()


@pytest.mark.parametrize("angle,flip", [(0.0, False), (23.0, False), (-40.0, True)])
def test_geometry_matches_torchvision(angle, flip):
    x = torch.rand(1, 3, 12, 12)
    out = data._geometry(x, torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.tensor([flip]), torch.tensor([angle]), 12)
    ref = TF.horizontal_flip(x[0]) if flip else x[0]
    ref = TF.rotate(ref, angle, interpolation=v2.InterpolationMode.BILINEAR)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)
    crop = data._geometry(x, torch.tensor([[2.0, 3.0, 6.0, 5.0]]), torch.tensor([False]), torch.tensor([0.0]), 6)
    ref = TF.resized_crop(x[0], 2, 3, 6, 5, [6, 6], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(crop[0], ref, atol=1e-5, rtol=0)


def test_hue_and_blur_match_torchvision():
    x = torch.rand(3, 3, 10, 10)
    shift = torch.tensor([0.13, -0.31, 0.5])
    hue = data._shift_hue(x, shift)
    blur = data._blur(x, torch.tensor([0.4, 1.0, 2.0]), 5)
    for i, sigma in enumerate([0.4, 1.0, 2.0]):
        torch.testing.assert_close(hue[i], TF.adjust_hue(x[i], float(shift[i])), atol=1e-5, rtol=0)
        torch.testing.assert_close(blur[i], TF.gaussian_blur(x[i], [5, 5], [sigma, sigma]), atol=1e-5, rtol=0)


def test_augment_spec_presets():
    d = data.augment_spec("digits", 16, (0.3,), (0.4,))
    assert d.flip_p == 0 and d.rotation > 0 and d.gray_p == 0
    assert data.augment_spec("imagenet", 96, (0,) * 3, (1,) * 3).blur_p == 0.5
    with pytest.raises(ValueError, match="augmentation preset"):
        data.augment_spec("strong", 16, (0,), (1,))
