"""Batched SimCLR augmentations: per-sample parameters sampled in Python (vectorized, from a
torch.Generator), applied by one fused C++/CUDA op on the device where the images already are.

    aug = SimCLRAugment.preset("imagenet", size=224)
    v1, v2 = aug(images, generator=g)             # two independent views of every image
    params = aug.sample(images, generator=g)      # the parameters of one view (AugmentParams)
    out = augment(images, params, out_dtype=torch.float32, mean=..., std=...)

Given the same parameters the result matches torchvision.transforms.v2.functional applied one image at a
time (simclr_reference.augment): resized_crop (bilinear, antialias=False) -> hflip -> rotate (nearest,
fill 0) -> color jitter in the sample's random order -> grayscale -> gaussian_blur -> solarize -> normalize.

Images: uint8 in [0, 255] or float in [0, 1] (a float image outside [0, 1] by more than 0.01 is refused: divide
by 255), as (B, C, H, W), (B, H, W, C), or a list of (C, H_i, W_i) images of different sizes; C is 1 or 3.
`layout="auto"` reads (B, C, H, W) when dim 1 is 1 or 3 and (B, H, W, C) when dim 3 is, and refuses a shape
where both are (e.g. a 3 x 3 image): pass layout="NCHW" or "NHWC" then.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, appendix A (data augmentation details).
"""
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ops

# Normalization statistics live in one place (stats.py), shared with the training recipe.
from .stats import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD

__all__ = ["AugmentParams", "SimCLRAugment", "augment"]


_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class AugmentParams:
    """Per-sample parameters of one view of a batch of B images (CPU tensors, shape (B,) unless noted).

    top, left, height, width: int64 crop box in source pixels; flip: bool; angle: float32 degrees
    (counter-clockwise); jitter: bool (color jitter applied); brightness, contrast, saturation: float32
    factors; hue: float32 shift in [-0.5, 0.5]; order: (B, 4) int64 permutation of the jitter ops
    (0 brightness, 1 contrast, 2 saturation, 3 hue); grayscale, blur, solarize: bool; sigma: float32 blur
    sigma; size: the output (H, W); kernel_size: the odd Gaussian kernel size.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    angle: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    size: Tuple[int, int]
    kernel_size: int

    def __len__(self):
        return int(self.top.shape[0])

    def packed(self) -> torch.Tensor:
        """(B, 19) float32 in the column order of csrc/augment/augment.h (enum Param)."""
        cols = [self.top, self.left, self.height, self.width, self.flip, self.angle, self.jitter,
                self.brightness, self.contrast, self.saturation, self.hue]
        cols = [c.reshape(-1, 1) for c in cols] + [self.order.reshape(-1, 4)]
        cols += [c.reshape(-1, 1) for c in (self.grayscale, self.blur, self.sigma, self.solarize)]
        return torch.cat([c.detach().to("cpu", torch.float32) for c in cols], dim=1).contiguous()

    def to_list(self):
        """One dict per sample (for logging and debugging)."""
        per = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("size", "kernel_size")}
        return [{k: v[b].tolist() for k, v in per.items()} for b in range(len(self))]


# ---------------------------------------------------------------------------------------------------
# Input handling


def _image_sizes(images, layout):
    """(B, channels, heights (B,), widths (B,), resolved layout) without touching the pixels."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images must contain at least one image, got an empty list")
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(im).__name__}")
            if im.dim() != 3:
                raise ValueError(f"images[{i}] must be 3-D (C, H, W), got shape {tuple(im.shape)}")
        chans = {im.shape[0] for im in images}
        if len(chans) != 1 or next(iter(chans)) not in (1, 3):
            raise ValueError("images in a list must all have 1 or all have 3 channels (C, H, W), "
                             f"got C = {sorted(chans)}")
        if layout not in ("auto", "NCHW"):
            raise ValueError(f"layout must be 'auto' or 'NCHW' for a list of (C, H, W) images, got {layout!r}")
        hs = torch.tensor([im.shape[1] for im in images], dtype=torch.int64)
        ws = torch.tensor([im.shape[2] for im in images], dtype=torch.int64)
        return len(images), next(iter(chans)), hs, ws, "NCHW"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or a list of tensors, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W) or (B, H, W, C), got shape {tuple(images.shape)}")
    if layout not in ("auto", "NCHW", "NHWC"):
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if layout == "auto":
        layout = _guess_layout(images.shape)
    b, c, h, w = (images.shape if layout == "NCHW"
                  else (images.shape[0], images.shape[3], images.shape[1], images.shape[2]))
    if c not in (1, 3):
        dim = 1 if layout == "NCHW" else 3
        raise ValueError(f"images must have 1 or 3 channels, got C = {c} in dim {dim} of shape {tuple(images.shape)} "
                         f"(layout {layout}){_RGBA_HINT if c == 4 else ''}")
    if b == 0:
        raise ValueError(f"images must contain at least one image, got an empty batch of shape {tuple(images.shape)}")
    if h == 0 or w == 0:
        raise ValueError(f"images must have a positive height and width, got shape {tuple(images.shape)}")
    return b, c, torch.full((b,), h, dtype=torch.int64), torch.full((b,), w, dtype=torch.int64), layout


_RGBA_HINT = "; for RGBA images drop the alpha channel first (images[:, :3] for NCHW, images[..., :3] for NHWC)"


def _guess_layout(shape):
    """layout="auto" for a 4-D shape: the one of dim 1 / dim 3 that can hold 1 or 3 channels; refuses a
    shape where both can (a 3 x 3 image, or W = 1 or 3) or neither can, naming both dimensions."""
    c1, c3 = shape[1] in (1, 3), shape[3] in (1, 3)
    if c1 and not c3:
        return "NCHW"
    if c3 and not c1:
        return "NHWC"
    if c1 and c3:
        raise ValueError(f"images of shape {tuple(shape)} are ambiguous: dim 1 ({shape[1]}) and dim 3 ({shape[3]}) "
                         "could both be the channels; pass layout='NCHW' (B, C, H, W) or layout='NHWC' (B, H, W, C)")
    hint = _RGBA_HINT if 4 in (shape[1], shape[3]) else ""
    raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(shape)}: neither dim 1 ({shape[1]}, NCHW) "
                     f"nor dim 3 ({shape[3]}, NHWC) is 1 or 3{hint}")


# Float pixels are [0, 1]; resampling or a colour conversion upstream may overshoot by a little.
_FLOAT_RANGE_SLACK = 1e-2


def _check_dtype(t, name):
    if t.dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return t
    raise TypeError(f"{name} must be uint8 (0..255) or floating point (0..1), got {t.dtype}")


def _check_pixels(t, name):
    if t.dtype == torch.uint8 or t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if t.dtype != torch.uint8:
            _check_float_range(t, name)
        return t if t.dtype in (torch.uint8, torch.float32) else t.float()
    raise TypeError(f"{name} must be uint8 (0..255) or floating point (0..1), got {t.dtype}")


def _check_float_range(t, name):
    """Float images outside [0, 1] (an uint8 image converted without / 255, or already normalized) would be
    jittered, clamped and blurred as if they were in range: refuse them. One reduction (a sync on CUDA)."""
    if t.numel() == 0:
        return
    lo, hi = (v.item() for v in torch.aminmax(t.detach().float()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must hold finite pixel values, got values in [{lo}, {hi}]")
    if lo < -_FLOAT_RANGE_SLACK or hi > 1 + _FLOAT_RANGE_SLACK:
        raise ValueError(f"float {name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: divide 0..255 pixels "
                         "by 255 (or pass them as uint8), and normalize after the augmentation (mean=, std=), not "
                         "before")


def _pack(images, layout):
    """The op's source buffer: (src 1-D, offsets (B,), channels_last flag), copying only when needed."""
    if isinstance(images, (list, tuple)) and all(im is images[0] for im in images):
        return _pack_one(images[0], len(images))
    if isinstance(images, (list, tuple)):
        dev, dt = images[0].device, images[0].dtype
        for i, im in enumerate(images):
            if im.device != dev or im.dtype != dt:
                raise ValueError(f"images[{i}] must have the device and dtype of images[0] ({dev}, {dt}), "
                                 f"got ({im.device}, {im.dtype})")
        flat = torch.cat([_check_dtype(im, f"images[{i}]").reshape(-1) for i, im in enumerate(images)])
        sizes = torch.tensor([im.numel() for im in images], dtype=torch.int64)
        offsets = torch.cumsum(sizes, 0) - sizes
        return _check_pixels(flat, "images"), offsets, False
    x = _check_pixels(images, "images")
    b = x.shape[0]
    per = x[0].numel()
    offsets = torch.arange(b, dtype=torch.int64) * per
    if layout == "NHWC":
        return x.contiguous().reshape(-1), offsets, True
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1), offsets, True  # a view: channels_last memory is NHWC
    return x.contiguous().reshape(-1), offsets, False


def _pack_one(image, views):
    """`views` views of one (C, H, W) image (SimCLRTransform's two): its pixels once, every offset 0. Planar
    (C, H, W) even for a view of (H, W, C) memory (a decoded image: pil_to_tensor's): one transposing copy
    for all the views costs less than the op's strided reads of channels-last rows (2x the op's time for a
    300 x 400 source, measured)."""
    image = _check_dtype(image, "images[0]")
    return _check_pixels(image.contiguous().reshape(-1), "images"), torch.zeros(views, dtype=torch.int64), False


def _size_pair(size, name="size"):
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def augment(images, params: AugmentParams, out_dtype: torch.dtype = torch.float32,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            solarize_threshold: float = 0.5, memory_format: torch.memory_format = torch.contiguous_format,
            layout: str = "auto") -> torch.Tensor:
    """The fused augmentation op: one view of every image with the given per-sample parameters.

    images: uint8 or float [0, 1], (B, C, H, W) / (B, H, W, C) / list of (C, H_i, W_i), C in {1, 3}, on any
    device; params: AugmentParams of B samples (CPU). Returns (B, C, *params.size) of out_dtype (float32,
    float16 or bfloat16) on the images' device, contiguous or torch.channels_last (memory_format),
    normalized with (mean, std) per channel when given.
    """
    b, c, hs, ws, layout = _image_sizes(images, layout)
    if not isinstance(params, AugmentParams):
        raise TypeError(f"params must be AugmentParams (from SimCLRAugment.sample), got {type(params).__name__}")
    if len(params) != b:
        raise ValueError(f"params has {len(params)} samples but images has {b}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    if mean is not None and (len(mean) != c or len(std) != c):
        raise ValueError(f"mean and std must have one value per channel ({c}), got {len(mean)} and {len(std)}")
    out_h, out_w = _size_pair(tuple(params.size), "params.size")
    src, offsets, src_cl = _pack(images, layout)
    shapes = torch.stack([hs, ws], dim=1).contiguous()
    return ops.augment(src, offsets, shapes, params.packed(), c, src_cl, out_h, out_w, int(params.kernel_size),
                          float(solarize_threshold), [float(m) for m in mean or []], [float(s) for s in std or []],
                          out_dtype, memory_format == torch.channels_last)


# ---------------------------------------------------------------------------------------------------
# Sampling


def _check_prob(name, p):
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(name, r, low=None, high=None):
    if not isinstance(r, (tuple, list)) or len(r) != 2 or not all(isinstance(v, (int, float)) for v in r):
        raise TypeError(f"{name} must be a pair (min, max) of numbers, got {r!r}")
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a finite range with min <= max, got {tuple(r)}")
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ValueError(f"{name} must lie within [{low}, {high}], got {tuple(r)}")
    return lo, hi


def default_blur_kernel(size: Tuple[int, int]) -> int:
    """About 10% of the shorter output side, made odd (SimCLR: 23 for 224), at least 3."""
    k = int(0.1 * min(size))
    k = k + 1 if k % 2 == 0 else k
    return max(k, 3)


def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _sample_crops(hs, ws, scale, ratio, g):
    """torchvision's RandomResizedCrop.make_params for every image at once: 10 attempts, the first that
    fits wins; images where none fits get the center crop clamped to the ratio range.

    The random numbers come from `g` (torch); the arithmetic runs in numpy float64, because torch's unary
    ops on these tiny tensors enter a parallel region each and cost milliseconds on a busy multi-core CPU."""
    b = hs.shape[0]
    u_area = torch.rand(b, 10, generator=g, dtype=torch.float64).numpy()
    u_ratio = torch.rand(b, 10, generator=g, dtype=torch.float64).numpy()
    u_top = torch.rand(b, generator=g, dtype=torch.float64).numpy()
    u_left = torch.rand(b, generator=g, dtype=torch.float64).numpy()
    h64, w64 = hs.numpy().astype(np.float64), ws.numpy().astype(np.float64)
    target = (h64 * w64)[:, None] * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)
    cw = np.round(np.sqrt(target * aspect))  # np.round, like Python's round, ties to even
    ch = np.round(np.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w64[:, None]) & (ch > 0) & (ch <= h64[:, None])
    first = fits.argmax(axis=1)[:, None]
    found = fits.any(axis=1)
    cw = np.take_along_axis(cw, first, axis=1)[:, 0]
    ch = np.take_along_axis(ch, first, axis=1)[:, 0]

    in_ratio = w64 / h64
    fb_w = np.where(in_ratio < ratio[0], w64, np.where(in_ratio > ratio[1], np.round(h64 * ratio[1]), w64))
    fb_h = np.where(in_ratio < ratio[0], np.round(w64 / ratio[0]), h64)
    cw = np.where(found, cw, fb_w)
    ch = np.where(found, ch, fb_h)
    top = np.where(found, np.floor(u_top * (h64 - ch + 1)), np.floor((h64 - ch) / 2))
    left = np.where(found, np.floor(u_left * (w64 - cw + 1)), np.floor((w64 - cw) / 2))
    top = np.minimum(top, h64 - ch)  # u < 1, but keep the box inside even at the float edge
    left = np.minimum(left, w64 - cw)
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (top, left, ch, cw))


class SimCLRAugment(torch.nn.Module):
    """SimCLR's augmentation of a batch, two views per call, every knob a constructor argument.

    Defaults are the paper's ImageNet pipeline (appendix A): RandomResizedCrop(size, scale=(0.08, 1),
    ratio=(3/4, 4/3)), horizontal flip p=0.5, color jitter of strength s (brightness, contrast, saturation
    0.8 s, hue 0.2 s) applied with p=0.8 in a random order, grayscale p=0.2, Gaussian blur p=0.5 with sigma
    in (0.1, 2.0) and a kernel of ~10% of the side, then normalization. rotation_degrees (0 = off) and
    solarize_p (0 = off; SimCLRv2/BYOL use it) extend it.

    aug(images, generator=g) -> (v1, v2), each (B, C, *size) of out_dtype on the images' device.
    """

    def __init__(self, size: Union[int, Tuple[int, int]] = 224, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), flip_p: float = 0.5,
                 rotation_degrees: float = 0.0, jitter_strength: float = 1.0, jitter_p: float = 0.8,
                 hue_strength: Optional[float] = None, grayscale_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: Tuple[float, float] = (0.1, 2.0), blur_kernel: Optional[int] = None,
                 solarize_p: float = 0.0, solarize_threshold: float = 0.5,
                 mean: Optional[Sequence[float]] = IMAGENET_MEAN, std: Optional[Sequence[float]] = IMAGENET_STD,
                 out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format, layout: str = "auto"):
        super().__init__()
        self.size = _size_pair(size)
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        if self.scale[1] <= 0:
            raise ValueError(f"scale must have a positive maximum, got {tuple(scale)}")
        self.ratio = _check_range("ratio", ratio, 0.0)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be positive, got {tuple(ratio)}")
        self.flip_p = _check_prob("flip_p", flip_p)
        if not isinstance(rotation_degrees, (int, float)) or not 0 <= rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {rotation_degrees!r}")
        self.rotation_degrees = float(rotation_degrees)
        if not isinstance(jitter_strength, (int, float)) or not 0 <= jitter_strength <= 1.25:
            # 0.8 s <= 1 keeps brightness/contrast/saturation factors >= 0 (torchvision's limit).
            raise ValueError(f"jitter_strength must be in [0, 1.25], got {jitter_strength!r}")
        self.jitter_strength = float(jitter_strength)
        hue = 0.2 * self.jitter_strength if hue_strength is None else hue_strength
        if not isinstance(hue, (int, float)) or not 0 <= hue <= 0.5:
            raise ValueError(f"hue_strength must be in [0, 0.5], got {hue!r}")
        self.hue_strength = float(hue)
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.grayscale_p = _check_prob("grayscale_p", grayscale_p)
        self.blur_p = _check_prob("blur_p", blur_p)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma)
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be positive, got {tuple(blur_sigma)}")
        k = default_blur_kernel(self.size) if blur_kernel is None else blur_kernel
        if not isinstance(k, int) or k < 1 or k % 2 == 0 or k // 2 >= min(self.size):
            raise ValueError(f"blur_kernel must be an odd int >= 1 with blur_kernel // 2 < min(size) = "
                             f"{min(self.size)}, got {k!r}")
        self.blur_kernel = k
        self.solarize_p = _check_prob("solarize_p", solarize_p)
        self.solarize_threshold = float(solarize_threshold)
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or both None for no normalization)")
        if std is not None and any(float(s) == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {tuple(std)}")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        if out_dtype not in _OUT_DTYPES:
            raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
        self.out_dtype = out_dtype
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError("memory_format must be torch.contiguous_format or torch.channels_last, "
                             f"got {memory_format}")
        self.memory_format = memory_format
        self.layout = layout

    @classmethod
    def preset(cls, name: str, size: Optional[Union[int, Tuple[int, int]]] = None, **overrides) -> "SimCLRAugment":
        """The paper's pipelines: "imagenet" (224), "cifar10" (32, s=0.5, no blur), "stl10" (96),
        "mnist" / "digits" (28, 1 channel: small rotation, no flip, no hue/saturation/grayscale, crops of at
        least half the image). Keyword overrides go to the constructor."""
        presets = {
            "imagenet": dict(size=224),
            "cifar10": dict(size=32, jitter_strength=0.5, blur_p=0.0, mean=CIFAR10_MEAN, std=CIFAR10_STD),
            # STL-10 has no canonical statistics in the paper; ImageNet's are the common choice.
            "stl10": dict(size=96),
            "mnist": dict(size=28, scale=(0.5, 1.0), flip_p=0.0, rotation_degrees=15.0, jitter_strength=0.5,
                          hue_strength=0.0, grayscale_p=0.0, blur_p=0.0, mean=MNIST_MEAN, std=MNIST_STD),
        }
        presets["digits"] = presets["mnist"]
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        kwargs = dict(presets[name])
        if size is not None:
            kwargs["size"] = size
        kwargs.update(overrides)
        return cls(**kwargs)

    def extra_repr(self):
        return (f"size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, "
                f"flip_p={self.flip_p}, rotation_degrees={self.rotation_degrees}, s={self.jitter_strength}, "
                f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, "
                f"blur_kernel={self.blur_kernel}, solarize_p={self.solarize_p}, out_dtype={self.out_dtype}")

    def sample(self, images, generator: Optional[torch.Generator] = None) -> AugmentParams:
        """Parameters of one view of every image, drawn from `generator` (a CPU torch.Generator; the
        default CPU generator when None), so a seed gives the same views on CPU and CUDA. Every call draws
        the same amount of randomness whatever the probabilities are."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        b, _, hs, ws, _ = _image_sizes(images, self.layout)
        g = generator
        top, left, ch, cw = _sample_crops(hs, ws, self.scale, self.ratio, g)
        flip = torch.rand(b, generator=g) < self.flip_p
        d = self.rotation_degrees
        angle = _uniform(b, -d, d, g).float()
        jitter = torch.rand(b, generator=g) < self.jitter_p
        j = 0.8 * self.jitter_strength
        brightness = _uniform(b, max(0.0, 1 - j), 1 + j, g).float()
        contrast = _uniform(b, max(0.0, 1 - j), 1 + j, g).float()
        saturation = _uniform(b, max(0.0, 1 - j), 1 + j, g).float()
        hue = _uniform(b, -self.hue_strength, self.hue_strength, g).float()
        order = torch.argsort(torch.rand(b, 4, generator=g), dim=1)
        gray = torch.rand(b, generator=g) < self.grayscale_p
        blur = torch.rand(b, generator=g) < self.blur_p
        sigma = _uniform(b, self.blur_sigma[0], self.blur_sigma[1], g).float()
        solarize = torch.rand(b, generator=g) < self.solarize_p
        return AugmentParams(top=top, left=left, height=ch, width=cw, flip=flip, angle=angle, jitter=jitter,
                             brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, order=order,
                             grayscale=gray, blur=blur, sigma=sigma, solarize=solarize, size=self.size,
                             kernel_size=self.blur_kernel)

    def view(self, images, params: AugmentParams) -> torch.Tensor:
        """One view with given parameters (the fused op with this module's output settings)."""
        return augment(images, params, out_dtype=self.out_dtype, mean=self.mean, std=self.std,
                       solarize_threshold=self.solarize_threshold, memory_format=self.memory_format,
                       layout=self.layout)

    def forward(self, images, generator: Optional[torch.Generator] = None):
        """Two independently augmented views (v1, v2) of every image."""
        p1 = self.sample(images, generator)
        p2 = self.sample(images, generator)
        return self.view(images, p1), self.view(images, p2)
