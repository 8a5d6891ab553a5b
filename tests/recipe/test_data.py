"""Datasets, the validation split and the evaluation transform (the augmentation is SimCLRAugment:
tests/test_augment*.py)."""
import numpy as np
import pytest
import torch

from simclr_ext.recipe import data


def _rows(images, labels):
    return {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(images, labels)}


def test_digits_splits_are_fixed_stratified_and_disjoint():
    a, b = data.load_dataset("digits"), data.load_dataset("digits")
    assert (len(a.pretrain), len(a.train), len(a.validation), len(a.test)) == (1007, 1007, 250, 540)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.validation.images, b.validation.images)
    assert a.pretrain.images.dtype == torch.uint8 and a.pretrain.images.shape[1:] == (1, 8, 8)
    assert int(a.pretrain.images.max()) == 255
    for split in (a.test, a.validation):
        counts = torch.bincount(split.labels, minlength=10).double() / len(split)
        assert (counts - 0.1).abs().max() < 0.015
    # the three labelled splits share no image (digits has a few exact duplicates across classes' scans:
    # allow the handful the original 70/30 split already had)
    train, val, test = (_rows(s.images, s.labels) for s in (a.train, a.validation, a.test))
    assert len(val & test) < 3 and len(train & val) < 3 and len(train & test) < 5
    # pretraining never sees the validation or test images
    assert torch.equal(a.pretrain.images, a.train.images)
    assert len(a.train) + len(a.validation) + len(a.test) == 1797


def test_carve_validation_is_seeded_stratified_and_a_partition(gen):
    labels = torch.randint(0, 7, (1000,), generator=gen)
    keep, val = data.carve_validation(labels, 0.1)
    keep2, val2 = data.carve_validation(labels, 0.1)
    assert torch.equal(val, val2) and torch.equal(keep, keep2)
    assert torch.equal(torch.sort(torch.cat([keep, val])).values, torch.arange(1000))
    for c in range(7):
        n = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == round(0.1 * n)
    assert not torch.equal(data.carve_validation(labels, 0.1, seed=1)[1], val)
    with pytest.raises(ValueError, match="validation fraction"):
        data.carve_validation(labels, 1.0)


def test_torchvision_datasets_get_a_validation_split_from_train(monkeypatch, gen):
    """CIFAR-10 stand-in (no download here): validation comes out of the training split, the test split
    stays whole, pretraining sees neither; CIFAR-100 gets its own statistics."""
    class Fake:
        def __init__(self, n):
            self.data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).numpy()
            self.targets = torch.randint(0, 10, (n,), generator=gen).tolist()

    sets = {True: Fake(500), False: Fake(100)}
    monkeypatch.setattr(data, "_torchvision_set", lambda name, root, download, train: sets[train])
    for name in ("cifar10", "cifar100"):
        s = data._torchvision_splits(name, "unused", False)
        held = sum(round(0.1 * c) for c in torch.bincount(torch.tensor(sets[True].targets)).tolist())
        assert (len(s.train), len(s.validation), len(s.test)) == (500 - held, held, 100) and 40 <= held <= 60
        assert s.pretrain is s.train
        train_rows = _rows(s.train.images, s.train.labels)
        assert not (_rows(s.validation.images, s.validation.labels) & train_rows)
        assert torch.equal(s.test.images, torch.as_tensor(sets[False].data).permute(0, 3, 1, 2))
    from simclr_ext.stats import CIFAR100_MEAN

    assert s.mean == CIFAR100_MEAN and s.num_classes == 100


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


def _image_folder(root, sizes, gen):
    from PIL import Image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    paths = {}
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                path = root / split / cls / f"{i}.png"
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
                paths[(split, cls, i)] = path
    return paths


def test_imagefolder_pretrains_on_whole_images_and_evaluates_with_resize_centre_crop(tmp_path, gen):
    from PIL import Image
    from torchvision import transforms

    sizes = [(30, 40), (24, 60), (50, 20), (36, 36), (28, 33), (45, 31), (20, 26), (33, 52), (40, 29), (27, 27)]
    _image_folder(tmp_path, sizes, gen)
    s = data.load_dataset("imagefolder", data_dir=str(tmp_path), image_size=16)
    assert s.num_classes == 2 and len(s.test) == 20 and len(s.validation) == 2 and len(s.train) == 18
    # pretraining: the whole image, aspect kept (the shorter side bounded by 2 x 16 = 32)
    images, labels = next(iter(s.pretrain.batches(torch.arange(len(s.pretrain)), 18, num_workers=2)))
    assert isinstance(images, list) and len(images) == 18
    samples = s.pretrain.dataset.samples
    for im, (path, _) in zip(images, samples):
        h, w = Image.open(path).size[::-1]
        if min(h, w) <= 32:
            assert tuple(im.shape) == (3, h, w)
        else:
            assert min(im.shape[1:]) == 32 and abs(im.shape[1] / im.shape[2] - h / w) < 0.05
    # evaluation: torchvision's protocol, resize the shorter side to floor(16 / 0.875) = 18, centre crop 16
    reference = transforms.Compose([transforms.Resize(18), transforms.CenterCrop(16), transforms.PILToTensor()])
    batch, test_labels = next(iter(s.test.batches(torch.arange(len(s.test)), 20, num_workers=2)))
    assert batch.shape == (20, 3, 16, 16) and batch.dtype == torch.uint8
    for im, (path, label), y in zip(batch, s.test.dataset.samples, test_labels):
        assert torch.equal(im, reference(Image.open(path).convert("RGB"))) and int(y) == label
    # the fused augmentation takes the ragged batch
    from simclr_ext import SimCLRAugment

    v1, v2 = SimCLRAugment.preset("imagenet", size=16)(images, generator=torch.Generator().manual_seed(0))
    assert v1.shape == (18, 3, 16, 16) and torch.isfinite(v1).all()


def test_eval_resize_side_is_torchvisions():
    assert data.eval_resize_side(224) == 256 and data.eval_resize_side(32) == 36


def test_eval_transform_normalizes_and_resizes():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    y = data.eval_transform(x, 16, (0.5,), (0.25,))
    assert y.shape == (2, 1, 16, 16) and torch.allclose(y, torch.full_like(y, 2.0))
