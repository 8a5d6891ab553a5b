// Math of the fused SimCLR augmentation op, shared by the CPU and CUDA kernels (host and device).
//
// Semantics are torchvision.transforms.v2.functional's on float images in [0, 1], applied in this order
// (python/simclr_reference/augment.py is the executable definition):
//   resized_crop(top, left, crop_h, crop_w, size, bilinear, antialias=False) -> hflip (if flip)
//   -> rotate(angle, NEAREST, fill 0) (if angle != 0)
//   -> color jitter in the sample's order (if jitter): adjust_brightness / contrast / saturation / hue
//   -> rgb_to_grayscale(3 channels) (if gray) -> gaussian_blur(kernel, sigma) (if blur)
//   -> solarize(threshold) (if solarize) -> normalize(mean, std).
// Geometry is one inverse mapping per output pixel: the nearest-rotation snap lands on a pixel of the
// flipped, resized crop, whose bilinear value is read straight from the source (uint8 or float).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace simclr_ext {
namespace augment {

// Columns of the (B, kNumParams) float32 parameter matrix. simclr_ext/augment.py writes the same order
// (AugmentParams.packed); crop boxes are integers, exact in float32.
enum Param : int {
  kTop = 0,
  kLeft,
  kCropH,
  kCropW,
  kFlip,
  kAngle,  // degrees, counter-clockwise like torchvision's rotate
  kJitter,
  kBrightness,
  kContrast,
  kSaturation,
  kHue,
  kOrder0,  // kOrder0..3: permutation of the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue)
  kOrder1,
  kOrder2,
  kOrder3,
  kGray,
  kBlur,
  kSigma,
  kSolarize,
  kNumParams
};

enum JitterOp : int { kOpBrightness = 0, kOpContrast = 1, kOpSaturation = 2, kOpHue = 3 };

// torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as in PIL).
constexpr float kGrayR = 0.2989f;
constexpr float kGrayG = 0.587f;
constexpr float kGrayB = 0.114f;

// Largest Gaussian kernel the op accepts; bounds the per-sample weight table of both kernels.
constexpr int kMaxBlurKernel = 255;

// One sample's parameters, decoded from its row of the parameter matrix.
struct View {
  int top, left, crop_h, crop_w;
  bool flip, rotate, jitter, gray, blur, solarize;
  double cos_t, sin_t;  // the rotation snap is done in double so it rounds like torchvision's float64 grid
  float brightness, contrast, saturation, hue, sigma;
  int order[4];
  int contrast_pos;  // index of the contrast op in order[], 4 when jitter is off
};

SIMCLR_HD View load_view(const float* row) {
  View v;
  v.top = static_cast<int>(row[kTop]);
  v.left = static_cast<int>(row[kLeft]);
  v.crop_h = static_cast<int>(row[kCropH]);
  v.crop_w = static_cast<int>(row[kCropW]);
  v.flip = row[kFlip] != 0.f;
  v.jitter = row[kJitter] != 0.f;
  v.gray = row[kGray] != 0.f;
  v.blur = row[kBlur] != 0.f;
  v.solarize = row[kSolarize] != 0.f;
  // torchvision reduces the angle mod 360 before converting to radians; do the same.
  double deg = ::fmod(static_cast<double>(row[kAngle]), 360.0);
  if (deg < 0) deg += 360.0;
  v.rotate = deg != 0.0;
  const double rad = deg * 3.14159265358979323846 / 180.0;
  v.cos_t = ::cos(rad);
  v.sin_t = ::sin(rad);
  v.brightness = row[kBrightness];
  v.contrast = row[kContrast];
  v.saturation = row[kSaturation];
  v.hue = row[kHue];
  v.sigma = row[kSigma];
  v.contrast_pos = 4;
  for (int k = 0; k < 4; ++k) {
    v.order[k] = static_cast<int>(row[kOrder0 + k]);
    if (v.jitter && v.order[k] == kOpContrast) v.contrast_pos = k;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Geometry

// Bilinear source index as torch's upsample_bilinear2d computes it (align_corners=False, explicit size):
// src = max(scale * (dst + 0.5) - 0.5, 0), i0 = floor(src), i1 = i0 + 1 clamped to the last pixel.
struct Tap {
  int i0, i1;
  float w0, w1;
};

SIMCLR_HD Tap bilinear_tap(int dst, float scale, int in_size) {
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  Tap t;
  t.i0 = static_cast<int>(src);
  if (t.i0 > in_size - 1) t.i0 = in_size - 1;
  t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
  t.w1 = src - static_cast<float>(t.i0);
  t.w0 = 1.f - t.w1;
  return t;
}

// Inverse of torchvision's rotate (expand=False, center = image center, NEAREST, padding zeros):
// output pixel (x, y) reads input pixel (xs, ys); returns false when that pixel is outside (fill 0).
// The grid is torchvision's _affine_grid followed by grid_sample's unnormalization and nearbyint.
SIMCLR_HD bool rotate_snap(int x, int y, int w, int h, double cos_t, double sin_t, int* xs, int* ys) {
  const double bx = static_cast<double>(x) + 0.5 - 0.5 * w;
  const double by = static_cast<double>(y) + 0.5 - 0.5 * h;
  const double sx = cos_t * bx - sin_t * by + 0.5 * w - 0.5;
  const double sy = sin_t * bx + cos_t * by + 0.5 * h - 0.5;
  const double rx = nearbyint(sx);  // round half to even, as grid_sample's nearest mode
  const double ry = nearbyint(sy);
  if (rx < 0.0 || rx > w - 1.0 || ry < 0.0 || ry > h - 1.0) return false;
  *xs = static_cast<int>(rx);
  *ys = static_cast<int>(ry);
  return true;
}

// Sources are read as raw values and scaled once after interpolation (uint8 -> [0, 1]).
SIMCLR_HD float raw(uint8_t v) { return static_cast<float>(v); }
SIMCLR_HD float raw(float v) { return v; }
template <typename T>
SIMCLR_HD constexpr float unit_scale() {
  return 1.f;
}
template <>
SIMCLR_HD constexpr float unit_scale<uint8_t>() {
  return 1.f / 255.f;
}

// Bilinear interpolation, horizontal then vertical (as upsample_bilinear2d), scaled to [0, 1] at the end.
// The two halves are separate so the CPU can reuse a horizontally interpolated source row.
SIMCLR_HD float lerp_x(float a0, float a1, const Tap& tx) { return tx.w0 * a0 + tx.w1 * a1; }
template <typename T>
SIMCLR_HD float lerp_y(float top, float bot, const Tap& ty) {
  return (ty.w0 * top + ty.w1 * bot) * unit_scale<T>();
}

// Bilinear combination of the four neighbours (row 0: a00 a01, row 1: a10 a11).
template <typename T>
SIMCLR_HD float bilinear_mix(float a00, float a01, float a10, float a11, const Tap& tx, const Tap& ty) {
  return lerp_y<T>(lerp_x(a00, a01, tx), lerp_x(a10, a11, tx), ty);
}

// One source image: element (c, y, x) is at base[c * sc + y * sy + x * sx].
template <typename T>
struct Source {
  const T* base;
  int64_t sc, sy, sx;
  int h, w;
};

// Output pixel (x, y) -> pixel (gx, gy) of the flipped, resized crop (out_w x out_h) that it shows,
// after the inverse rotation; false when the rotation brings in fill (0) instead.
SIMCLR_HD bool geometry_pixel(const View& v, int x, int y, int out_w, int out_h, int* gx, int* gy) {
  if (v.rotate && !rotate_snap(x, y, out_w, out_h, v.cos_t, v.sin_t, &x, &y)) return false;
  *gx = v.flip ? out_w - 1 - x : x;
  *gy = y;
  return true;
}

SIMCLR_HD Tap crop_tap_x(const View& v, int gx, int out_w) {
  return bilinear_tap(gx, static_cast<float>(v.crop_w) / static_cast<float>(out_w), v.crop_w);
}

SIMCLR_HD Tap crop_tap_y(const View& v, int gy, int out_h) {
  return bilinear_tap(gy, static_cast<float>(v.crop_h) / static_cast<float>(out_h), v.crop_h);
}

// Bilinear value of the crop at the taps (tx, ty), per channel, in [0, 1].
template <typename T>
SIMCLR_HD void bilinear_read(const Source<T>& s, const View& v, const Tap& tx, const Tap& ty, int channels,
                             float* out) {
  const int64_t r0 = static_cast<int64_t>(v.top + ty.i0) * s.sy;
  const int64_t r1 = static_cast<int64_t>(v.top + ty.i1) * s.sy;
  const int64_t c0 = static_cast<int64_t>(v.left + tx.i0) * s.sx;
  const int64_t c1 = static_cast<int64_t>(v.left + tx.i1) * s.sx;
  for (int c = 0; c < channels; ++c) {
    const T* p = s.base + c * s.sc;
    out[c] = bilinear_mix<T>(raw(p[r0 + c0]), raw(p[r0 + c1]), raw(p[r1 + c0]), raw(p[r1 + c1]), tx, ty);
  }
}

// Value of output pixel (x, y) after resized crop, flip and rotation, per channel.
template <typename T>
SIMCLR_HD void sample_geometry(const Source<T>& s, const View& v, int x, int y, int out_w, int out_h, int channels,
                               float* out) {
  int gx, gy;
  if (!geometry_pixel(v, x, y, out_w, out_h, &gx, &gy)) {
    for (int c = 0; c < channels; ++c) out[c] = 0.f;
    return;
  }
  bilinear_read(s, v, crop_tap_x(v, gx, out_w), crop_tap_y(v, gy, out_h), channels, out);
}

// ---------------------------------------------------------------------------------------------------
// Color (torchvision's float tensor implementations, per pixel)

SIMCLR_HD float clamp01(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

SIMCLR_HD float luma(const float* p, int channels) {
  return channels == 3 ? kGrayR * p[0] + kGrayG * p[1] + kGrayB * p[2] : p[0];
}

SIMCLR_HD void blend(float* p, int channels, float other, float ratio) {
  for (int c = 0; c < channels; ++c) p[c] = clamp01(ratio * p[c] + (1.f - ratio) * other);
}

// adjust_hue: RGB -> HSV (torchvision's _rgb_to_hsv), shift h mod 1, HSV -> RGB (_hsv_to_rgb). Written
// without branches or libm calls (every floor/fmod below has an argument range where a compare is exact)
// so the CPU loop over a row vectorizes; the arithmetic is torchvision's, operation for operation.
SIMCLR_HD void adjust_hue(float* p, float hue) {
  const float r = p[0], g = p[1], b = p[2];
  // Plain compares (not fmaxf) vectorize on the CPU; inputs are never NaN.
  const float mgb = g > b ? g : b, ngb = g < b ? g : b;
  const float maxc = r > mgb ? r : mgb;
  const float minc = r < ngb ? r : ngb;
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.f : maxc);
  const float div = eqc ? 1.f : range;
  const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  const float hr = bc - gc, hg = 2.f + rc - bc, hb = 4.f + gc - rc;
  float h = maxc == g ? hg : hb;  // two-way selects only: the CPU loop if-converts and vectorizes
  h = maxc == r ? hr : h;
  h = h * (1.f / 6.f) + 1.f;  // in [5/6, 2): fmod(h, 1) is h - 1 (exact) above 1
  h = h >= 1.f ? h - 1.f : h;
  h = h + hue;  // in [-0.5, 1.5): torch.remainder(h, 1) adds or subtracts 1
  h = h < 0.f ? h + 1.f : h;
  h = h >= 1.f ? h - 1.f : h;
  const float v = maxc;
  const float h6 = h * 6.f;  // in [0, 6): truncation is floor
  int i = static_cast<int>(h6);
  const float f = h6 - static_cast<float>(i);
  i = i >= 6 ? i - 6 : i;
  const float sxf = s * f;
  const float q = clamp01((1.f - sxf) * v);
  const float t = clamp01((sxf + (1.f - s)) * v);
  const float pp = clamp01((1.f - s) * v);
  // torchvision's select table: i -> (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q);
  // 0/1 masks times the candidates (exact: x * 1 + 0 + 0 + 0 == x) rather than a 6-way select, which
  // compilers turn back into branches that mispredict on every other pixel.
  const float m0 = static_cast<float>(i == 0), m1 = static_cast<float>(i == 1), m2 = static_cast<float>(i == 2);
  const float m3 = static_cast<float>(i == 3), m4 = static_cast<float>(i == 4), m5 = static_cast<float>(i == 5);
  p[0] = v * (m0 + m5) + q * m1 + t * m4 + pp * (m2 + m3);
  p[1] = v * (m1 + m2) + t * m0 + q * m3 + pp * (m4 + m5);
  p[2] = v * (m3 + m4) + t * m2 + q * m5 + pp * (m0 + m1);
}

// One jitter op. Saturation and hue are the identity on 1-channel images (as in torchvision);
// contrast blends with `mean`, the grayscale mean of the whole image at this point of the pipeline.
SIMCLR_HD void apply_jitter_op(int op, float* p, int channels, const View& v, float mean) {
  switch (op) {
    case kOpBrightness:
      for (int c = 0; c < channels; ++c) p[c] = clamp01(p[c] * v.brightness);
      break;
    case kOpContrast:
      blend(p, channels, mean, v.contrast);
      break;
    case kOpSaturation:
      if (channels == 3) blend(p, channels, luma(p, channels), v.saturation);
      break;
    default:
      // A zero shift is the identity up to the float32 rounding of torchvision's HSV round trip (a few
      // ulps): skipping it saves the most expensive color op where a preset or sample does not shift hue.
      if (channels == 3 && v.hue != 0.f) adjust_hue(p, v.hue);
      break;
  }
}

// The jitter ops that precede contrast: their result decides the contrast mean.
// The loops have the constant bound 4 so they unroll and order[] stays in registers on the GPU.
SIMCLR_HD void color_before_contrast(float* p, int channels, const View& v) {
  if (!v.jitter) return;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    if (k < v.contrast_pos) apply_jitter_op(v.order[k], p, channels, v, 0.f);
  }
}

// Contrast (with its mean), the jitter ops after it, then grayscale.
SIMCLR_HD void color_from_contrast(float* p, int channels, const View& v, float mean) {
  if (v.jitter) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) {
      if (k >= v.contrast_pos) apply_jitter_op(v.order[k], p, channels, v, mean);
    }
  }
  if (v.gray && channels == 3) {
    const float l = luma(p, channels);
    p[0] = p[1] = p[2] = l;
  }
}

// ---------------------------------------------------------------------------------------------------
// Blur, solarize, normalize

// Reflect padding without repeating the edge (torch.nn.functional.pad mode="reflect"); needs r < n.
SIMCLR_HD int reflect(int i, int n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}

// Unnormalized tap d in [-r, r] of torchvision's Gaussian kernel (exp(-d^2 / (2 sigma^2))).
SIMCLR_HD float gauss_tap(int d, float sigma) {
  const float z = static_cast<float>(d) / sigma;
  return expf(-0.5f * z * z);
}

// Solarize (p >= threshold -> 1 - p) then normalize with (mean, 1 / std) of channel c.
SIMCLR_HD float finish(float x, bool solarize, float threshold, float mean, float inv_std) {
  if (solarize && x >= threshold) x = 1.f - x;
  return (x - mean) * inv_std;
}

}  // namespace augment
}  // namespace simclr_ext
