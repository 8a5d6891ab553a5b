"""Datasets as uint8 image batches and the evaluation transform.

Every dataset is split three ways: `pretrain` (unlabelled images for SimCLR), `train` (labelled images
for the probes) and `test` (held out). Images travel as uint8 (B, C, H, W) batches; the two views for
pretraining come from the fused `simclr_ext.SimCLRAugment` (the trainer builds it from the dataset's
preset name, `DataSplits.augment`, and the dataset's mean/std).
"""
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DEFAULT_AUGMENT", "DataNotFoundError", "ImageSet", "DataSplits", "load_dataset", "eval_transform",
           "digits_splits"]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "stl10", "imagefolder")
# The SimCLRAugment preset of each dataset (DataSplits.augment).
DEFAULT_AUGMENT = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar10",
                   "stl10": "stl10", "imagefolder": "imagenet"}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where the user said; the message names the path and how to fix it."""


class ImageSet:
    """Labelled images, either in memory as a uint8 (N, C, H, W) tensor or behind a map-style dataset
    returning (uint8 CHW tensor, label) (ImageFolder), read through a DataLoader."""

    def __init__(self, images: Optional[torch.Tensor], labels: torch.Tensor, dataset=None):
        if images is not None and (images.dtype != torch.uint8 or images.ndim != 4):
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.dataset = images, labels.long(), dataset

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int, num_workers: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yields (uint8 images (B, C, H, W), labels (B,)) over `order` in consecutive batches."""
        if self.images is not None:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, order.tolist()),
                                             batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for images, labels in loader:
            yield images, labels.long()


@dataclass
class DataSplits:
    name: str
    pretrain: ImageSet
    train: ImageSet
    test: ImageSet
    num_classes: int
    channels: int
    image_size: int           # side of the model's input
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: str              # the SimCLRAugment preset of the dataset ("digits", "mnist", "cifar10", ...)


def digits_splits(seed: int = 0, test_fraction: float = 0.3) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as uint8, split 70/30 stratified
    with a fixed seed; pretraining uses the 70% (labels unused)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    train = ImageSet(images[tr], labels[tr])
    return DataSplits("digits", train, train, ImageSet(images[te], labels[te]), 10, 1, 16,
                      (0.3,), (0.38,), "digits")


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
        pretrain = ImageSet(torch.cat([as_set["train"].images, as_set["unlabeled"].images]),
                            torch.cat([as_set["train"].labels, as_set["unlabeled"].labels]))
        return DataSplits(name, pretrain, as_set["train"], as_set["test"], 10, 3, 96,
                          (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), "stl10")
    tr = _torchvision_set(name, root, download, train=True)
    te = _torchvision_set(name, root, download, train=False)
    train = ImageSet(_hwc_to_chw(tr.data), torch.as_tensor(tr.targets))
    test = ImageSet(_hwc_to_chw(te.data), torch.as_tensor(te.targets))
    if name == "mnist":
        return DataSplits(name, train, train, test, 10, 1, 28, (0.1307,), (0.3081,), "mnist")
    classes = 10 if name == "cifar10" else 100
    return DataSplits(name, train, train, test, classes, 3, 32,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar10")


class _FolderImages(torch.utils.data.Dataset):
    """An ImageFolder whose images are resized (shorter side) and centre-cropped to `side` as uint8,
    so they batch; the random crops of the augmentation are then taken from that square."""

    def __init__(self, root: str, side: int):
        import torchvision
        from torchvision.transforms import v2

        self.folder = torchvision.datasets.ImageFolder(root)
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(side, antialias=True), v2.CenterCrop(side)])

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        image = self.folder.loader(path)
        return self.transform(image.convert("RGB")), label


def _imagefolder_splits(root: str, image_size: int) -> DataSplits:
    if not os.path.isdir(root):
        raise _missing("imagefolder", root, "--data-dir must be a folder with train/ and val/ (or test/) "
                                            "subfolders of one folder per class")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        raise _missing("imagefolder", root, "expected train/ and val/ (or test/) subfolders, one folder per class")
    side = int(math.ceil(image_size * 8 / 7))  # the 224-from-256 ratio of ImageNet evaluation
    train_ds, test_ds = _FolderImages(os.path.join(root, "train"), side), _FolderImages(test_dir, side)
    labels = lambda ds: torch.tensor([y for _, y in ds.folder.samples], dtype=torch.long)  # noqa: E731
    train = ImageSet(None, labels(train_ds), train_ds)
    return DataSplits("imagefolder", train, train, ImageSet(None, labels(test_ds), test_ds),
                      len(train_ds.folder.classes), 3, image_size,
                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")


def load_dataset(name: str = "digits", data_dir: Optional[str] = None, download: bool = False,
                 image_size: Optional[int] = None, seed: int = 0) -> DataSplits:
    """The named dataset's pretrain/train/test splits. torchvision datasets read `data_dir` (default
    ./data) and download only when asked; a missing dataset raises DataNotFoundError naming the path."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if name == "digits":
        splits = digits_splits(seed=0)  # the split is part of the benchmark: fixed, not the run's seed
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
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        splits.image_size = image_size
    return splits


def eval_transform(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, size, size): scaled to [0, 1], resized if needed, normalized."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
