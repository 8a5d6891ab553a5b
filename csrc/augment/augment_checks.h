// Argument checks of the augmentation op, shared by every backend so that CPU and CUDA reject bad input
// with the same messages before any work is done. Host-only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "augment/augment.h"

namespace simclr_ext {
namespace augment {

// Everything a kernel needs besides the tensors, validated.
struct Config {
  int64_t batch;
  int channels;
  int out_h, out_w;
  int radius;  // blur kernel radius, blur_kernel / 2
  float threshold;
  float mean[3];
  float inv_std[3];
};

inline Config check_args(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes,
                         const at::Tensor& params, int64_t channels, int64_t out_h, int64_t out_w, int64_t blur_kernel,
                         double solarize_threshold, c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                         at::ScalarType out_dtype) {
  TORCH_CHECK(src.dim() == 1 && src.is_contiguous(), "src must be a contiguous 1-D buffer of packed images, got shape ",
              src.sizes());
  TORCH_CHECK(src.scalar_type() == at::kByte || src.scalar_type() == at::kFloat, "src must be uint8 or float32, got ",
              src.scalar_type());
  TORCH_CHECK(channels == 1 || channels == 3, "channels must be 1 or 3, got ", channels);
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, "offsets must be a 1-D int64 tensor, got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  const int64_t batch = offsets.size(0);
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == batch && shapes.size(1) == 2 && shapes.scalar_type() == at::kLong,
              "shapes must be int64 of shape [", batch, ", 2] (H, W per image), got ", shapes.scalar_type(), " ",
              shapes.sizes());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == batch && params.size(1) == kNumParams &&
                  params.scalar_type() == at::kFloat,
              "params must be float32 of shape [", batch, ", ", static_cast<int>(kNumParams), "], got ",
              params.scalar_type(), " ", params.sizes());
  for (const auto* t : {&offsets, &shapes, &params}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "offsets, shapes and params must be contiguous CPU tensors (they are validated on the host), got ",
                t->device());
  }
  TORCH_CHECK(out_h > 0 && out_w > 0 && out_h <= (1 << 20) && out_w <= (1 << 20),
              "size must be positive (and at most 2^20), got (", out_h, ", ", out_w, ")");
  TORCH_CHECK(blur_kernel >= 1 && blur_kernel % 2 == 1 && blur_kernel <= kMaxBlurKernel,
              "blur_kernel must be odd and in [1, ", kMaxBlurKernel, "], got ", blur_kernel);
  TORCH_CHECK(blur_kernel / 2 < out_h && blur_kernel / 2 < out_w, "blur_kernel // 2 (", blur_kernel / 2,
              ") must be smaller than the output size (", out_h, ", ", out_w, ") for reflect padding");
  TORCH_CHECK(std::isfinite(solarize_threshold), "solarize_threshold must be finite, got ", solarize_threshold);
  TORCH_CHECK(mean.size() == std.size() && (mean.empty() || static_cast<int64_t>(mean.size()) == channels),
              "mean and std must both be empty or both have one value per channel (", channels, "), got ", mean.size(),
              " and ", std.size());
  for (double s : std) TORCH_CHECK(std::isfinite(s) && s != 0.0, "std must be finite and non-zero, got ", s);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", out_dtype);

  Config cfg;
  cfg.batch = batch;
  cfg.channels = static_cast<int>(channels);
  cfg.out_h = static_cast<int>(out_h);
  cfg.out_w = static_cast<int>(out_w);
  cfg.radius = static_cast<int>(blur_kernel / 2);
  cfg.threshold = static_cast<float>(solarize_threshold);
  for (int c = 0; c < 3; ++c) {
    cfg.mean[c] = mean.empty() ? 0.f : static_cast<float>(mean[c < channels ? c : 0]);
    cfg.inv_std[c] = std.empty() ? 1.f : static_cast<float>(1.0 / std[c < channels ? c : 0]);
  }
  return cfg;
}

// Per-image checks that need the values of offsets, shapes and params (host copies, (B,) and (B, 2) and
// (B, kNumParams)): every crop box inside its image, every image inside src, sane factors. Out-of-range
// values here would otherwise read out of bounds.
inline void check_values(const int64_t* offsets, const int64_t* shapes, const float* params, const Config& cfg,
                         int64_t src_numel) {
  for (int64_t b = 0; b < cfg.batch; ++b) {
    const int64_t h = shapes[2 * b], w = shapes[2 * b + 1];
    TORCH_CHECK(h > 0 && w > 0 && h < (1 << 24) && w < (1 << 24), "image ", b, " must have a positive size, got (", h,
                ", ", w, ")");
    TORCH_CHECK(offsets[b] >= 0 && offsets[b] + cfg.channels * h * w <= src_numel, "image ", b, " (offset ", offsets[b],
                ", ", cfg.channels, "x", h, "x", w, ") lies outside src (", src_numel, " elements)");
    const float* row = params + b * kNumParams;
    const float top = row[kTop], left = row[kLeft], ch = row[kCropH], cw = row[kCropW];
    TORCH_CHECK(top >= 0 && left >= 0 && ch >= 1 && cw >= 1 && top + ch <= h && left + cw <= w &&
                    top == std::floor(top) && left == std::floor(left) && ch == std::floor(ch) && cw == std::floor(cw),
                "params: crop box of sample ", b, " (top ", top, ", left ", left, ", height ", ch, ", width ", cw,
                ") must be integral and inside its ", h, "x", w, " image");
    TORCH_CHECK(std::isfinite(row[kAngle]), "params: angle of sample ", b, " must be finite, got ", row[kAngle]);
    if (row[kJitter] != 0.f) {
      TORCH_CHECK(row[kBrightness] >= 0 && row[kContrast] >= 0 && row[kSaturation] >= 0,
                  "params: brightness, contrast and saturation of sample ", b, " must be >= 0, got ", row[kBrightness],
                  ", ", row[kContrast], ", ", row[kSaturation]);
      TORCH_CHECK(row[kHue] >= -0.5f && row[kHue] <= 0.5f, "params: hue of sample ", b, " must be in [-0.5, 0.5], got ",
                  row[kHue]);
      bool seen[4] = {false, false, false, false};
      for (int k = 0; k < 4; ++k) {
        const float o = row[kOrder0 + k];
        TORCH_CHECK(o == 0 || o == 1 || o == 2 || o == 3, "params: order of sample ", b,
                    " must be a permutation of 0..3, got ", o, " at position ", k);
        seen[static_cast<int>(o)] = true;
      }
      TORCH_CHECK(seen[0] && seen[1] && seen[2] && seen[3], "params: order of sample ", b,
                  " must be a permutation of 0..3");
    }
    if (row[kBlur] != 0.f) {
      TORCH_CHECK(row[kSigma] > 0 && std::isfinite(row[kSigma]), "params: sigma of sample ", b, " must be > 0, got ",
                  row[kSigma]);
    }
  }
}

// Every check of the op, in the order each backend must run them before touching the data.
inline Config check_inputs(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes,
                           const at::Tensor& params, int64_t channels, int64_t out_h, int64_t out_w,
                           int64_t blur_kernel, double solarize_threshold, c10::ArrayRef<double> mean,
                           c10::ArrayRef<double> std, at::ScalarType out_dtype) {
  const Config cfg = check_args(src, offsets, shapes, params, channels, out_h, out_w, blur_kernel, solarize_threshold,
                                mean, std, out_dtype);
  check_values(offsets.data_ptr<int64_t>(), shapes.data_ptr<int64_t>(), params.data_ptr<float>(), cfg, src.numel());
  return cfg;
}

}  // namespace augment
}  // namespace simclr_ext
