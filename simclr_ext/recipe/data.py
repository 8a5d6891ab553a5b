"""Datasets as uint8 image batches, the validation split, and the evaluation transform.

Every dataset is split four ways: `pretrain` (unlabelled images for SimCLR), `train` (labelled images
for the probes), `validation` (carved from the training split with a fixed seed, stratified: the split
that settings are tuned on) and `test` (held out, read once for the numbers to quote). Images travel as
uint8 (B, C, H, W) batches, or as lists of (C, H_i, W_i) images of different sizes (ImageFolder
pretraining, which crops from the whole image); the two views for pretraining come from the fused
`simclr_ext.SimCLRAugment`, which takes both.
"""
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..stats import DATASET_STATS

__all__ = ["DATASETS", "DEFAULT_AUGMENT", "DataNotFoundError", "ImageSet", "DataSplits", "load_dataset",
           "eval_transform", "digits_splits", "carve_validation", "eval_resize_side", "VALIDATION_FRACTION",
           "SPLIT_SEED"]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "stl10", "imagefolder")
# The SimCLRAugment preset of each dataset (DataSplits.augment).
DEFAULT_AUGMENT = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar10",
                   "stl10": "stl10", "imagefolder": "imagenet"}
# Share of each class of the training split set aside as validation. Digits keeps more (20% of 1257 =
# 252 images) so that one image is 0.4 points, not 0.8; the others 10% (CIFAR: 5000 of 50000).
VALIDATION_FRACTION = {"digits": 0.2, "mnist": 0.1, "cifar10": 0.1, "cifar100": 0.1, "stl10": 0.1, "imagefolder": 0.1}
# The splits are part of the benchmark: fixed, never the run's seed.
SPLIT_SEED = 0
# Torchvision's classification protocol: resize the shorter side to size / 0.875 (224 -> 256), centre crop.
EVAL_CROP_FRACTION = 0.875
# ImageFolder pretraining decodes each image with its shorter side at most this many times the model's
# input side (aspect ratio kept): crops come from the whole image while a huge photo stays bounded.
PRETRAIN_DECODE_FACTOR = 2

Batch = Union[torch.Tensor, List[torch.Tensor]]


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where the user said; the message names the path and how to fix it."""


def _collate(samples):
    """Stack same-sized images into (B, C, H, W); keep a list of (C, H_i, W_i) when sizes differ."""
    images = [im for im, _ in samples]
    labels = torch.tensor([int(y) for _, y in samples], dtype=torch.long)
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), labels
    return images, labels


class ImageSet:
    """Labelled images, either in memory as a uint8 (N, C, H, W) tensor or behind a map-style dataset
    returning (uint8 CHW tensor, label) (ImageFolder), decoded in DataLoader workers."""

    def __init__(self, images: Optional[torch.Tensor], labels: torch.Tensor, dataset=None):
        if images is not None and (images.dtype != torch.uint8 or images.ndim != 4):
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if images is None and dataset is None:
            raise ValueError("ImageSet needs images or a dataset")
        self.images, self.labels, self.dataset = images, labels.long(), dataset

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images at `index` (int64), in that order."""
        index = index.long()
        if self.images is not None:
            return ImageSet(self.images[index], self.labels[index])
        return ImageSet(None, self.labels[index], torch.utils.data.Subset(self.dataset, index.tolist()))

    def batches(self, order: torch.Tensor, batch_size: int,
                num_workers: int = 0) -> Iterator[Tuple[Batch, torch.Tensor]]:
        """Yields (images, labels (B,)) over `order` in consecutive batches: images are a uint8
        (B, C, H, W) tensor, or a list of (C, H_i, W_i) tensors when the sizes differ."""
        if self.images is not None:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, order.tolist()),
                                             batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=_collate)
        yield from loader


@dataclass
class DataSplits:
    name: str
    pretrain: ImageSet
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    num_classes: int
    channels: int
    image_size: int           # side of the model's input
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: str              # the SimCLRAugment preset of the dataset ("digits", "mnist", "cifar10", ...)


def carve_validation(labels: torch.Tensor, fraction: float,
                     seed: int = SPLIT_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), both sorted: `fraction` of each class (rounded) drawn with a
    seeded generator, so the split is the same on every machine and every run."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        take = int(round(fraction * len(members)))
        held.append(members[torch.randperm(len(members), generator=g)[:take]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(held)] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def _with_validation(name: str, train: ImageSet, test: ImageSet, num_classes: int, channels: int, size: int,
                     pretrain_extra: Optional[ImageSet] = None) -> DataSplits:
    """Splits where validation is carved from `train` and pretraining sees only what is left of it
    (plus `pretrain_extra`, e.g. STL-10's unlabelled images): validation images never shape the encoder."""
    keep, val = carve_validation(train.labels, VALIDATION_FRACTION[name])
    train, validation = train.subset(keep), train.subset(val)
    pretrain = train
    if pretrain_extra is not None:
        pretrain = ImageSet(torch.cat([train.images, pretrain_extra.images]),
                            torch.cat([train.labels, pretrain_extra.labels]))
    mean, std = DATASET_STATS[name]
    return DataSplits(name, pretrain, train, validation, test, num_classes, channels, size, mean, std,
                      DEFAULT_AUGMENT[name])


def digits_splits(test_fraction: float = 0.3) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as uint8: 30% held out as the test
    split (stratified, fixed seed), then 20% of the rest as validation; pretraining and the probes use
    the remaining 1005 images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=SPLIT_SEED,
                              stratify=d.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return _with_validation("digits", ImageSet(images[tr], labels[tr]), ImageSet(images[te], labels[te]), 10, 1, 16)


def _missing(name: str, path: str, hint: str) -> DataNotFoundError:
    return DataNotFoundError(f"{name} not found under {os.path.abspath(path)!r}: {hint}")


def _torchvision_set(name: str, root: str, download: bool, **kwargs):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100, "stl10": torchvision.datasets.STL10}[name]
    try:
        return cls(root, download=download, **kwargs)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise _missing(name, root, "pass --download to fetch it, or point --data-dir at a folder that "
                                   f"holds it ({e})") from None


def _hwc_to_chw(array) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(array))
    return (t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)).contiguous()


def _torchvision_splits(name: str, root: str, download: bool) -> DataSplits:
    if name == "stl10":
        sets = {s: _torchvision_set(name, root, download, split=s) for s in ("train", "unlabeled", "test")}
        as_set = {s: ImageSet(torch.as_tensor(v.data), torch.as_tensor(v.labels)) for s, v in sets.items()}
        return _with_validation(name, as_set["train"], as_set["test"], 10, 3, 96, pretrain_extra=as_set["unlabeled"])
    tr = _torchvision_set(name, root, download, train=True)
    te = _torchvision_set(name, root, download, train=False)
    train = ImageSet(_hwc_to_chw(tr.data), torch.as_tensor(tr.targets))
    test = ImageSet(_hwc_to_chw(te.data), torch.as_tensor(te.targets))
    if name == "mnist":
        return _with_validation(name, train, test, 10, 1, 28)
    return _with_validation(name, train, test, 10 if name == "cifar10" else 100, 3, 32)


def eval_resize_side(size: int) -> int:
    """The shorter side before the centre crop of evaluation: floor(size / 0.875) (224 -> 256)."""
    return int(math.floor(size / EVAL_CROP_FRACTION))


class _FolderImages(torch.utils.data.Dataset):
    """The images of an ImageFolder as uint8 CHW tensors. mode "pretrain": the whole image, its shorter
    side bounded by PRETRAIN_DECODE_FACTOR * size (aspect kept; the random crops of the augmentation are
    taken from it); mode "eval": resize the shorter side to size / 0.875, centre crop size x size."""

    def __init__(self, samples: List[Tuple[str, int]], loader, size: int, mode: str):
        from torchvision.transforms import v2

        self.samples, self.loader, self.size, self.mode = samples, loader, size, mode
        if mode == "eval":
            self.transform = v2.Compose([v2.Resize(eval_resize_side(size), antialias=True), v2.CenterCrop(size),
                                         v2.PILToTensor()])
        elif mode == "pretrain":
            self.transform = None
        else:
            raise ValueError(f"mode must be 'pretrain' or 'eval', got {mode!r}")

    def __len__(self):
        return len(self.samples)

    def _bounded(self, image):
        from torchvision.transforms import v2

        bound = PRETRAIN_DECODE_FACTOR * self.size
        if min(image.size) > bound:
            image.draft("RGB", (bound, bound))  # JPEG: decode at a reduced scale when it is enough
            image = v2.functional.resize(image, bound, antialias=True)
        return v2.functional.pil_to_tensor(image)

    def __getitem__(self, i):
        path, label = self.samples[i]
        image = self.loader(path).convert("RGB")
        return (self._bounded(image) if self.transform is None else self.transform(image)), label


def _imagefolder_splits(root: str, image_size: int) -> DataSplits:
    import torchvision

    if not os.path.isdir(root):
        raise _missing("imagefolder", root, "--data-dir must be a folder with train/ and val/ (or test/) "
                                            "subfolders of one folder per class")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        raise _missing("imagefolder", root, "expected train/ and val/ (or test/) subfolders, one folder per class")
    train_folder = torchvision.datasets.ImageFolder(os.path.join(root, "train"))
    test_folder = torchvision.datasets.ImageFolder(test_dir)
    if test_folder.classes != train_folder.classes:
        raise _missing("imagefolder", root, f"{test_dir!r} must hold the same class folders as train/")
    labels = lambda folder: torch.tensor([y for _, y in folder.samples], dtype=torch.long)  # noqa: E731
    all_train = labels(train_folder)
    keep, val = carve_validation(all_train, VALIDATION_FRACTION["imagefolder"])
    pick = lambda idx: [train_folder.samples[i] for i in idx.tolist()]  # noqa: E731
    make = lambda samples, mode: _FolderImages(samples, train_folder.loader, image_size, mode)  # noqa: E731
    pretrain = ImageSet(None, all_train[keep], make(pick(keep), "pretrain"))
    train = ImageSet(None, all_train[keep], make(pick(keep), "eval"))
    validation = ImageSet(None, all_train[val], make(pick(val), "eval"))
    test = ImageSet(None, labels(test_folder), make(test_folder.samples, "eval"))
    mean, std = DATASET_STATS["imagefolder"]
    return DataSplits("imagefolder", pretrain, train, validation, test, len(train_folder.classes), 3, image_size,
                      mean, std, DEFAULT_AUGMENT["imagefolder"])


def load_dataset(name: str = "digits", data_dir: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None) -> DataSplits:
    """The named dataset's pretrain/train/validation/test splits. torchvision datasets read `data_dir`
    (default ./data) and download only when asked; a missing dataset raises DataNotFoundError naming the
    path. The splits never depend on a run's seed."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if name == "digits":
        splits = digits_splits()
    elif name == "imagefolder":
        if data_dir is None:
            raise ValueError("dataset 'imagefolder' needs --data-dir (a folder with train/ and val/)")
        splits = _imagefolder_splits(data_dir, image_size or 224)
    else:
        root = data_dir or "data"
        if not download and not os.path.isdir(root):
            raise _missing(name, root, "pass --download to fetch it, or point --data-dir at a folder that holds it")
        splits = _torchvision_splits(name, root, download)
    if image_size is not None:
        splits.image_size = image_size
    return splits


def eval_transform(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, size, size): scaled to [0, 1], resized if needed, normalized.
    (ImageFolder images arrive already resized and centre-cropped by the dataset, in its workers.)"""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
