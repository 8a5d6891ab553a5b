"""Reference SimCLR augmentation: torchvision.transforms.v2.functional applied one image at a time with
exactly the sampled parameters. This is the definition of correct for simclr_ext.augment.

`params` is any object with simclr_ext.AugmentParams' attributes (this module never imports simclr_ext):
per-sample tensors top, left, height, width, flip, angle, jitter, brightness, contrast, saturation, hue,
order (B, 4), grayscale, blur, sigma, solarize, plus the ints size (H, W) and kernel_size.
"""
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["augment"]

# The jitter op codes of `params.order` (the same as torchvision's ColorJitter fn_idx).
_JITTER = {
    0: lambda x, p, b: F.adjust_brightness(x, float(p.brightness[b])),
    1: lambda x, p, b: F.adjust_contrast(x, float(p.contrast[b])),
    2: lambda x, p, b: F.adjust_saturation(x, float(p.saturation[b])),
    3: lambda x, p, b: F.adjust_hue(x, float(p.hue[b])),
}


def _to_unit(img, dtype):
    return img.to(dtype) / 255 if img.dtype == torch.uint8 else img.to(dtype)


def augment_one(img, params, b, mean=None, std=None, solarize_threshold=0.5, dtype=torch.float64):
    """View b of one (C, H, W) image (uint8, or float in [0, 1]); returns (C, *params.size) in `dtype`."""
    x = _to_unit(img, dtype)
    size = list(params.size)
    # Plain bilinear (antialias=False): a rotation composed with the crop cannot be antialiased separably,
    # and SimCLR's own pipeline resizes without an antialiasing filter.
    x = F.resized_crop(x, int(params.top[b]), int(params.left[b]), int(params.height[b]), int(params.width[b]),
                       size, interpolation=InterpolationMode.BILINEAR, antialias=False)
    if bool(params.flip[b]):
        x = F.horizontal_flip(x)
    angle = float(params.angle[b])
    if angle != 0.0:
        x = F.rotate(x, angle, interpolation=InterpolationMode.NEAREST)
    if bool(params.jitter[b]):
        for op in params.order[b].tolist():
            x = _JITTER[int(op)](x, params, b)
    if bool(params.grayscale[b]) and x.shape[0] == 3:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if bool(params.blur[b]):
        k = int(params.kernel_size)
        s = float(params.sigma[b])
        x = F.gaussian_blur(x, [k, k], [s, s])
    if bool(params.solarize[b]):
        x = F.solarize(x, solarize_threshold)
    if mean is not None:
        x = F.normalize(x, list(mean), list(std))
    return x


def augment(images, params, mean=None, std=None, solarize_threshold=0.5, dtype=torch.float64):
    """Views of a batch: images (B, C, H, W) or a list of (C, H_i, W_i); returns (B, C, *params.size)."""
    return torch.stack([augment_one(img, params, b, mean, std, solarize_threshold, dtype)
                        for b, img in enumerate(images)])
