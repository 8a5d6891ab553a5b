"""Datasets as uint8 image batches, the evaluation transform, and the two-view augmentation.

Every dataset is split three ways: `pretrain` (unlabelled images for SimCLR), `train` (labelled images
for the probes) and `test` (held out). Images travel as uint8 (B, C, H, W) batches; the augmentation
is one callable `aug(images_uint8_BCHW, generator) -> (v1, v2)` made by `make_augment`, so the fused
kernels of simclr_ext.augment can replace the per-image torchvision version in one place.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataNotFoundError", "ImageSet", "DataSplits", "AugmentSpec", "load_dataset",
           "make_augment", "augment_spec", "eval_transform", "digits_splits"]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "stl10", "imagefolder")


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
    augment: str              # name of the default augmentation preset


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
                          (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), "imagenet")
    tr = _torchvision_set(name, root, download, train=True)
    te = _torchvision_set(name, root, download, train=False)
    train = ImageSet(_hwc_to_chw(tr.data), torch.as_tensor(tr.targets))
    test = ImageSet(_hwc_to_chw(te.data), torch.as_tensor(te.targets))
    if name == "mnist":
        return DataSplits(name, train, train, test, 10, 1, 28, (0.1307,), (0.3081,), "digits")
    classes = 10 if name == "cifar10" else 100
    return DataSplits(name, train, train, test, classes, 3, 32,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar")


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


@dataclass
class AugmentSpec:
    """Parameters of one SimCLR view distribution (SimCLR appendix A, plus rotation for digits)."""
    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotation: float = 0.0            # max |angle| in degrees
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)


def augment_spec(preset: str, size: int, mean, std) -> AugmentSpec:
    """Presets: "cifar" (SimCLR CIFAR: no blur, jitter strength 0.5), "imagenet" (jitter strength 1,
    blur p=0.5), "digits" (grey digits: moderate crops, small rotations, no flip, mild contrast)."""
    if preset == "cifar":
        return AugmentSpec(size, tuple(mean), tuple(std))
    if preset == "imagenet":
        return AugmentSpec(size, tuple(mean), tuple(std), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)
    if preset == "digits":
        return AugmentSpec(size, tuple(mean), tuple(std), crop_scale=(0.5, 1.0), crop_ratio=(0.8, 1.25),
                           flip_p=0.0, rotation=15.0, jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.8, gray_p=0.0)
    raise ValueError(f"augmentation preset must be 'cifar', 'imagenet' or 'digits', got {preset!r}")


def _crop_boxes(b: int, h: int, w: int, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, height, width) as float (b, 4), sampled like torchvision:
    up to 10 tries of (area, log-ratio) per image, the first that fits wins, else the whole image."""
    tries = 10
    area = h * w * torch.empty(b, tries).uniform_(*spec.crop_scale, generator=g)
    log_r = torch.empty(b, tries).uniform_(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), generator=g)
    cw = torch.sqrt(area * torch.exp(log_r)).round()
    ch = torch.sqrt(area / torch.exp(log_r)).round()
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = ok.float().argmax(1, keepdim=True)
    found = ok.any(1)
    bh = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((b,), float(h)))
    bw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((b,), float(w)))
    u = torch.rand(b, 2, generator=g)
    top = torch.floor(u[:, 0] * (h - bh + 1))
    left = torch.floor(u[:, 1] * (w - bw + 1))
    return torch.stack([top, left, bh, bw], 1)


def _geometry(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, angle_deg: torch.Tensor, size: int):
    """Resized crop (bilinear, sampling clamped to the box like crop-then-resize), horizontal flip, then
    rotation about the centre with zero fill (torchvision's sign: positive is counter-clockwise), all
    batched with grid_sample."""
    b, _, h, w = x.shape
    top, left, bh, bw = boxes.unbind(1)
    steps = torch.arange(size, dtype=torch.float32) + 0.5

    def axis(start, length, extent):
        # pixel-centre source coordinates of resize(align_corners=False), kept inside the box
        src = start[:, None] + (steps[None, :] * length[:, None] / size - 0.5)
        src = torch.minimum(torch.maximum(src, start[:, None]), (start + length - 1)[:, None])
        return (src + 0.5) / extent * 2 - 1

    gx, gy = axis(left, bw, w), axis(top, bh, h)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], -1)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    if bool((angle_deg != 0).any()):
        a = torch.deg2rad(angle_deg)
        cos, sin = torch.cos(a), torch.sin(a)
        # the inverse map of the rotation, in normalized coordinates of the square output
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(a)], 1),
                             torch.stack([sin, cos, torch.zeros_like(a)], 1)], 1)
        rgrid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], size, size], align_corners=False)
        out = F.grid_sample(out, rgrid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _jitter(x: torch.Tensor, spec: AugmentSpec, apply: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """ColorJitter with torchvision's factor ranges (1 +- s; hue +- s) in a random order per image.
    Saturation and hue need colour, so grey images get brightness and contrast only."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=g) * 2 - 1
    order = torch.argsort(torch.rand(b, 4, generator=g), dim=1)
    colour = x.shape[1] == 3
    for r in range(4):
        for k in range(4):
            s = spec.jitter[k]
            sel = apply & (order[:, r] == k)
            if s == 0 or (k >= 2 and not colour) or not bool(sel.any()):
                continue
            f = (1 + s * u[:, k]).clamp_min(0).view(b, 1, 1, 1)
            if k == 0:
                y = x * f
            elif k == 1:
                y = (x - _grey(x).mean((1, 2, 3), keepdim=True)) * f + _grey(x).mean((1, 2, 3), keepdim=True)
            elif k == 2:
                y = (x - _grey(x)) * f + _grey(x)
            else:
                y = _shift_hue(x, s * u[:, 3])
            x = torch.where(sel.view(b, 1, 1, 1), y.clamp(0, 1), x)
    return x


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by shift[i] turns (HSV round trip, like adjust_hue)."""
    r, g_, b_ = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g_ - b_) / safe, torch.where(maxc == g_, 2 + (b_ - r) / safe, 4 + (r - g_) / safe))
    h = torch.where(delta > 0, h / 6 % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h.unsqueeze(1) * 6) % 6
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1)))


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (reflect padding, as torchvision)."""
    b, c, h, w = x.shape
    t = torch.arange(kernel, dtype=x.dtype) - (kernel - 1) / 2
    k1 = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)          # (b * c, kernel)
    y = F.pad(x.reshape(1, b * c, h, w), [kernel // 2] * 4, mode="reflect")
    y = F.conv2d(y, k1.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, k1.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


def _one_view(images: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """One augmented view of every image, computed batched on float [0, 1] pixels."""
    b, c, h, w = images.shape
    boxes = _crop_boxes(b, h, w, spec, g)
    flip = torch.rand(b, generator=g) < spec.flip_p
    angle = torch.empty(b).uniform_(-spec.rotation, spec.rotation, generator=g)
    do_jitter = torch.rand(b, generator=g) < spec.jitter_p
    x = _geometry(images.float() / 255.0, boxes, flip, angle, spec.size)
    x = _jitter(x, spec, do_jitter, g)
    gray = torch.rand(b, generator=g) < spec.gray_p
    if c == 3:
        x = torch.where(gray.view(b, 1, 1, 1), _grey(x).expand_as(x), x)
    blur = torch.rand(b, generator=g) < spec.blur_p
    sigma = torch.empty(b).uniform_(*spec.blur_sigma, generator=g)
    if bool(blur.any()):
        x = torch.where(blur.view(b, 1, 1, 1), _blur(x, sigma, max(3, int(0.1 * spec.size) // 2 * 2 + 1)), x)
    m = torch.tensor(spec.mean).view(1, -1, 1, 1)
    s = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - m) / s


def make_augment(spec: AugmentSpec) -> Callable[[torch.Tensor, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]:
    """The two-view augmentation: aug(images uint8 (B, C, H, W), generator) -> (v1, v2), float32
    (B, C, size, size) normalized views, reproducible from the generator's state. Batched PyTorch ops
    (grid_sample for crop + flip, then rotation); this is the one place to swap in the fused
    simclr_ext.SimCLRAugment."""
    def aug(images: torch.Tensor, generator: torch.Generator):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        return _one_view(images, spec, generator), _one_view(images, spec, generator)
    return aug
