// CPU kernel of the fused augmentation op: images are spread over threads (at::parallel_for), and each
// image goes through at most three passes over a per-thread float scratch of the output size, a row at a
// time:
//   1. geometry (one bilinear read from the source) + the jitter ops before contrast, summing the luma
//      that contrast blends with (the only whole-image dependency of the color ops);
//   2. contrast + the rest of the jitter + grayscale;
//   3. the vertical half of the Gaussian blur, which solarizes, normalizes and writes the output.
// Whichever of passes 1 and 2 finishes a row's colors also writes it out (no blur) or blurs it
// horizontally while it is in L1 (blur). Without jitter, pass 1 finishes every row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

// Our kernels (everything below, the shared header included) never rely on floating-point traps; without
// them GCC if-converts the compares of adjust_hue and the row loops vectorize. Results are unchanged:
// rounding is not affected, only the assumption that a compare may trap.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "augment/augment.h"
#include "augment/augment_checks.h"

// The hot row loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time
// (GCC function multiversioning): twice the vector width where the CPU has it, a portable .so either way.
// No FMA in the clone, so both versions round identically.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SIMCLR_ROW_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define SIMCLR_ROW_KERNEL
#endif

namespace simclr_ext {
namespace augment {
namespace {

// Where channel c of pixel (y, x) of image b goes in the output (B, C, H, W), contiguous or channels_last.
struct OutLayout {
  int64_t sb, sc, sy, sx;
};

OutLayout out_layout(const Config& cfg, bool channels_last) {
  const int64_t hw = static_cast<int64_t>(cfg.out_h) * cfg.out_w;
  if (channels_last) return {hw * cfg.channels, 1, static_cast<int64_t>(cfg.out_w) * cfg.channels, cfg.channels};
  return {hw * cfg.channels, hw, cfg.out_w, 1};
}

// Per-thread scratch: two planar (C, H, W) float images, a padded row, the Gaussian weights, cached
// interpolated rows and bilinear taps. Kept per thread across calls (thread_local): fresh buffers of this
// size come straight from mmap and page-fault on every call.
struct Scratch {
  std::vector<float> a, b, row, acc, weights, lerp;
  std::vector<Tap> taps_x, taps_xf, taps_y;
  void fit(const Config& cfg) {
    a.resize(static_cast<size_t>(cfg.channels) * cfg.out_h * cfg.out_w);
    b.resize(a.size());
    row.resize(static_cast<size_t>(cfg.out_w) + 2 * cfg.radius);
    acc.resize(cfg.out_w);
    weights.resize(2 * cfg.radius + 1);
    lerp.resize(6 * static_cast<size_t>(cfg.out_w));
    taps_x.resize(cfg.out_w);
    taps_xf.resize(cfg.out_w);
    taps_y.resize(cfg.out_h);
  }
};

// Finish (solarize, normalize) n values of channel c and write them as output row y, channel c; the
// contiguous case is a plain vectorizable loop.
template <typename O>
inline void write_row(O* out, const OutLayout& lay, int c, int y, const float* x, int n, const View& v,
                      const Config& cfg) {
  O* o = out + c * lay.sc + y * lay.sy;
  const float thr = cfg.threshold, m = cfg.mean[c], is = cfg.inv_std[c];
  if (lay.sx == 1) {
    for (int i = 0; i < n; ++i) o[i] = static_cast<O>(finish(x[i], v.solarize, thr, m, is));
  } else {
    for (int i = 0; i < n; ++i) o[i * lay.sx] = static_cast<O>(finish(x[i], v.solarize, thr, m, is));
  }
}

// The color ops run a row at a time over planar channels, one op per loop (the op is loop-invariant), so
// the compiler vectorizes them; each element goes through the same header helpers as on the GPU.
struct Row {
  float* ch[3];
  int n;
};

// Its own function so that the three planes are known not to alias: the loop then vectorizes.
SIMCLR_ROW_KERNEL void hue_row(float* __restrict r, float* __restrict g, float* __restrict b, int n,
                                       float hue) {
  for (int i = 0; i < n; ++i) {
    float p[3] = {r[i], g[i], b[i]};
    adjust_hue(p, hue);
    r[i] = p[0];
    g[i] = p[1];
    b[i] = p[2];
  }
}

SIMCLR_ROW_KERNEL void jitter_row(int op, const Row& row, int C, const View& v, float mean) {
  switch (op) {
    case kOpBrightness:
      for (int c = 0; c < C; ++c) {
        float* x = row.ch[c];
        for (int i = 0; i < row.n; ++i) x[i] = clamp01(x[i] * v.brightness);
      }
      break;
    case kOpContrast:
      for (int c = 0; c < C; ++c) {
        float* x = row.ch[c];
        for (int i = 0; i < row.n; ++i) x[i] = clamp01(v.contrast * x[i] + (1.f - v.contrast) * mean);
      }
      break;
    case kOpSaturation:
      if (C == 3) {
        float* r = row.ch[0];
        float* g = row.ch[1];
        float* b = row.ch[2];
        const float f = v.saturation;
        for (int i = 0; i < row.n; ++i) {
          const float l = kGrayR * r[i] + kGrayG * g[i] + kGrayB * b[i];
          r[i] = clamp01(f * r[i] + (1.f - f) * l);
          g[i] = clamp01(f * g[i] + (1.f - f) * l);
          b[i] = clamp01(f * b[i] + (1.f - f) * l);
        }
      }
      break;
    default:
      if (C == 3) hue_row(row.ch[0], row.ch[1], row.ch[2], row.n, v.hue);
      break;
  }
}

SIMCLR_ROW_KERNEL void gray_row(const Row& row, int C) {
  if (C != 3) return;
  float* r = row.ch[0];
  float* g = row.ch[1];
  float* b = row.ch[2];
  for (int i = 0; i < row.n; ++i) r[i] = g[i] = b[i] = kGrayR * r[i] + kGrayG * g[i] + kGrayB * b[i];
}

SIMCLR_ROW_KERNEL float luma_row_sum(const Row& row, int C) {
  float sum = 0.f;
  if (C == 3) {
    for (int i = 0; i < row.n; ++i) sum += kGrayR * row.ch[0][i] + kGrayG * row.ch[1][i] + kGrayB * row.ch[2][i];
  } else {
    for (int i = 0; i < row.n; ++i) sum += row.ch[0][i];
  }
  return sum;
}

template <typename O>
inline void finish_row(const Row& row, int C, int y, const View& v, const Config& cfg, O* out, const OutLayout& lay) {
  for (int c = 0; c < C; ++c) write_row(out, lay, c, y, row.ch[c], row.n, v, cfg);
}

// Horizontal half of the bilinear resampling of source row p (taps along x, flip folded in).
template <typename T>
inline void lerp_x_row_impl(const T* p, const Tap* taps, int W, int64_t sx, float* o) {
  for (int x = 0; x < W; ++x) o[x] = lerp_x(raw(p[taps[x].i0 * sx]), raw(p[taps[x].i1 * sx]), taps[x]);
}
SIMCLR_ROW_KERNEL void lerp_x_row(const uint8_t* p, const Tap* taps, int W, int64_t sx, float* o) {
  lerp_x_row_impl(p, taps, W, sx, o);
}
SIMCLR_ROW_KERNEL void lerp_x_row(const float* p, const Tap* taps, int W, int64_t sx, float* o) {
  lerp_x_row_impl(p, taps, W, sx, o);
}

// Vertical half: output row from the two horizontally interpolated source rows.
template <typename T>
SIMCLR_ROW_KERNEL void lerp_y_row(const float* top, const float* bot, int W, const Tap& ty, float* o) {
  for (int x = 0; x < W; ++x) o[x] = lerp_y<T>(top[x], bot[x], ty);
}

// Horizontally interpolated source rows of one image, two per channel: row i lives in slot i % 2, so the
// pair (i, i + 1) that an output row reads never evicts itself, and consecutive output rows of an
// upscaled crop reuse the rows they share.
struct RowCache {
  float* buf[3][2];
  int index[3][2];
  void reset(float* base, int W) {
    for (int c = 0; c < 3; ++c) {
      for (int k = 0; k < 2; ++k) {
        buf[c][k] = base + (2 * c + k) * static_cast<int64_t>(W);
        index[c][k] = -1;
      }
    }
  }
  template <typename T>
  const float* get(const Source<T>& src, const View& v, int c, int i, const Tap* taps, int W) {
    const int k = i & 1;
    if (index[c][k] != i) {
      lerp_x_row(src.base + c * src.sc + (v.top + i) * src.sy + v.left * src.sx, taps, W, src.sx, buf[c][k]);
      index[c][k] = i;
    }
    return buf[c][k];
  }
};

// Normalized Gaussian weights of the sample (torchvision: softmax of -d^2 / (2 sigma^2)).
inline void blur_weights(const View& v, const Config& cfg, Scratch& s) {
  const int r = cfg.radius, k = 2 * r + 1;
  float total = 0.f;
  for (int t = 0; t < k; ++t) total += (s.weights[t] = gauss_tap(t - r, v.sigma));
  for (int t = 0; t < k; ++t) s.weights[t] /= total;
}

// Horizontal blur of a finished color row (still in L1) into row y of s.b, with reflect padding. The
// kernel is symmetric (w[t] == w[k-1-t] exactly): taps are paired to halve the multiplies.
SIMCLR_ROW_KERNEL void hblur_row(const Row& in, int y, int C, const Config& cfg, Scratch& s) {
  const int W = cfg.out_w, r = cfg.radius, k = 2 * r + 1;
  const int64_t hw = static_cast<int64_t>(cfg.out_h) * W;
  const float* w = s.weights.data();
  float* row = s.row.data();
  for (int c = 0; c < C; ++c) {
    const float* x_in = in.ch[c];
    for (int i = 0; i < W + 2 * r; ++i) row[i] = x_in[reflect(i - r, W)];
    float* o = s.b.data() + c * hw + static_cast<int64_t>(y) * W;
    for (int x = 0; x < W; ++x) o[x] = w[r] * row[x + r];
    for (int t = 0; t < r; ++t) {
      const float wt = w[t];
      const float* lo = row + t;
      const float* hi = row + (k - 1 - t);
      for (int x = 0; x < W; ++x) o[x] += wt * (lo[x] + hi[x]);
    }
  }
}

// Passes 1 and 2 (see the top of the file). A row whose colors are final is written out, or, for a
// blurred sample, blurred horizontally into s.b at once.
template <typename T, typename O>
void color_passes(const Source<T>& src, const View& v, const Config& cfg, Scratch& s, O* out, const OutLayout& lay) {
  const int H = cfg.out_h, W = cfg.out_w, C = cfg.channels;
  const int64_t hw = static_cast<int64_t>(H) * W;
  // The bilinear taps depend only on the (post-rotation) crop pixel, so they are tabulated once per image.
  for (int x = 0; x < W; ++x) s.taps_x[x] = crop_tap_x(v, x, W);
  for (int y = 0; y < H; ++y) s.taps_y[y] = crop_tap_y(v, y, H);
  auto row_at = [&](int y) {
    Row row;
    for (int c = 0; c < 3; ++c) row.ch[c] = s.a.data() + (c < C ? c : 0) * hw + static_cast<int64_t>(y) * W;
    row.n = W;
    return row;
  };
  if (v.blur) blur_weights(v, cfg, s);
  double luma_sum = 0.0;
  // Without rotation, output row y reads two source rows: one loop per channel over precomputed taps
  // (flip folded into their order) instead of the per-pixel inverse mapping.
  RowCache cache;
  if (!v.rotate) {
    for (int x = 0; x < W; ++x) s.taps_xf[x] = s.taps_x[v.flip ? W - 1 - x : x];
    cache.reset(s.lerp.data(), W);
  }
  for (int y = 0; y < H; ++y) {
    const Row row = row_at(y);
    if (v.rotate) {
      for (int x = 0; x < W; ++x) {
        float p[3] = {0.f, 0.f, 0.f};
        int gx, gy;
        if (geometry_pixel(v, x, y, W, H, &gx, &gy)) bilinear_read(src, v, s.taps_x[gx], s.taps_y[gy], C, p);
        for (int c = 0; c < C; ++c) row.ch[c][x] = p[c];
      }
    } else {
      const Tap ty = s.taps_y[y];
      for (int c = 0; c < C; ++c) {
        const float* top = cache.get(src, v, c, ty.i0, s.taps_xf.data(), W);
        const float* bot = cache.get(src, v, c, ty.i1, s.taps_xf.data(), W);
        lerp_y_row<T>(top, bot, W, ty, row.ch[c]);
      }
    }
    if (v.jitter) {
      for (int k = 0; k < v.contrast_pos; ++k) jitter_row(v.order[k], row, C, v, 0.f);
      luma_sum += luma_row_sum(row, C);
    } else {
      if (v.gray) gray_row(row, C);
      if (v.blur) {
        hblur_row(row, y, C, cfg, s);
      } else {
        finish_row(row, C, y, v, cfg, out, lay);
      }
    }
  }
  if (!v.jitter) return;
  const float mean = static_cast<float>(luma_sum / static_cast<double>(hw));
  for (int y = 0; y < H; ++y) {
    const Row row = row_at(y);
    for (int k = v.contrast_pos; k < 4; ++k) jitter_row(v.order[k], row, C, v, mean);
    if (v.gray) gray_row(row, C);
    if (v.blur) {
      hblur_row(row, y, C, cfg, s);
    } else {
      finish_row(row, C, y, v, cfg, out, lay);
    }
  }
}

// Row y of the vertical blur of an H x W plane (reflect padding, symmetric taps paired) into acc.
SIMCLR_ROW_KERNEL void vblur_row(const float* plane, int y, int H, int W, int r, const float* w, float* acc) {
  const float* mid = plane + static_cast<int64_t>(y) * W;
  for (int x = 0; x < W; ++x) acc[x] = w[r] * mid[x];
  for (int t = 0; t < r; ++t) {
    const float wt = w[t];
    const float* lo = plane + static_cast<int64_t>(reflect(y + t - r, H)) * W;
    const float* hi = plane + static_cast<int64_t>(reflect(y + r - t, H)) * W;
    for (int x = 0; x < W; ++x) acc[x] += wt * (lo[x] + hi[x]);
  }
}

// Pass 3: vertical blur of s.b (reflect padding), loops ordered so the inner loop runs along a row and
// vectorizes; each finished row is solarized, normalized and written.
template <typename O>
void vblur_pass(const View& v, const Config& cfg, Scratch& s, O* out, const OutLayout& lay) {
  const int H = cfg.out_h, W = cfg.out_w, C = cfg.channels, r = cfg.radius;
  const int64_t hw = static_cast<int64_t>(H) * W;
  float* acc = s.acc.data();
  for (int c = 0; c < C; ++c) {
    const float* hplane = s.b.data() + c * hw;
    for (int y = 0; y < H; ++y) {
      vblur_row(hplane, y, H, W, r, s.weights.data(), acc);
      write_row(out, lay, c, y, acc, W, v, cfg);
    }
  }
}

template <typename T, typename O>
void run(const at::Tensor& src, const int64_t* offsets, const int64_t* shapes, const float* params, bool src_cl,
         const Config& cfg, at::Tensor& out, bool out_cl) {
  const T* base = src.data_ptr<T>();
  O* out_base = out.data_ptr<O>();
  const OutLayout lay = out_layout(cfg, out_cl);
  // One image is plenty of work for a thread (>= 32 x 32 pixels through several passes).
  at::parallel_for(0, cfg.batch, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch scratch;
    scratch.fit(cfg);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t h = shapes[2 * b], w = shapes[2 * b + 1];
      Source<T> s;
      s.base = base + offsets[b];
      s.h = static_cast<int>(h);
      s.w = static_cast<int>(w);
      s.sc = src_cl ? 1 : h * w;
      s.sy = src_cl ? w * cfg.channels : w;
      s.sx = src_cl ? cfg.channels : 1;
      const View v = load_view(params + b * kNumParams);
      O* o = out_base + b * lay.sb;
      color_passes<T, O>(s, v, cfg, scratch, o, lay);
      if (v.blur) vblur_pass<O>(v, cfg, scratch, o, lay);
    }
  });
}

at::Tensor augment_cpu(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes,
                       const at::Tensor& params, int64_t channels, bool src_channels_last, int64_t out_h,
                       int64_t out_w, int64_t blur_kernel, double solarize_threshold, c10::ArrayRef<double> mean,
                       c10::ArrayRef<double> std, at::ScalarType out_dtype, bool out_channels_last) {
  const Config cfg = check_inputs(src, offsets, shapes, params, channels, out_h, out_w, blur_kernel,
                                  solarize_threshold, mean, std, out_dtype);
  at::Tensor out = at::empty({cfg.batch, channels, out_h, out_w}, src.options().dtype(out_dtype),
                             out_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (cfg.batch == 0) return out;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* shp = shapes.data_ptr<int64_t>();
  const float* prm = params.data_ptr<float>();
  const bool u8 = src.scalar_type() == at::kByte;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "simclr_ext::augment (cpu)", [&] {
    if (u8) {
      run<uint8_t, scalar_t>(src, off, shp, prm, src_channels_last, cfg, out, out_channels_last);
    } else {
      run<float, scalar_t>(src, off, shp, prm, src_channels_last, cfg, out, out_channels_last);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(simclr_ext, CPU, m) { m.impl("augment", &augment_cpu); }

}  // namespace augment
}  // namespace simclr_ext
