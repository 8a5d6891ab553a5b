// CPU kernel of the fused augmentation op: images are spread over threads (at::parallel_for), and each
// image goes through at most three passes over a per-thread float scratch of the output size, a row at a
// time:
//   1. geometry (one bilinear read from the source) + the jitter ops before contrast, summing the luma
//      that contrast blends with (the only whole-image dependency of the color ops);
//   2. contrast + the rest of the jitter + grayscale;
//   3. the vertical half of the Gaussian blur, which solarizes, normalizes and writes the output.
// Whichever of passes 1 and 2 finishes a row's colors also writes it out (no blur) or blurs it
// horizontally while it is in L1 (blur). Without jitter, pass 1 finishes every row.
// Every step is a loop over a contiguous row of one plane, multiversioned (csrc/common/simd.h):
// bilinear rows by explicit gathers, one loop per color op, the blur with its accumulators in registers
// over the taps that carry weight, normalize fused with the output store. Each output element goes
// through the same operations in the same order whatever the ISA and the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "common/simd.h"
#ifdef SIMCLR_X86_CLONES
#include <immintrin.h>
#endif
#include <vector>

#include "common/dispatch.h"

// Our kernels (everything below, the shared header included) never rely on floating-point traps; without
// them GCC if-converts the compares of adjust_hue and the row loops vectorize. Results are unchanged:
// rounding is not affected, only the assumption that a compare may trap.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "augment/augment.h"
#include "augment/augment_checks.h"

// Each image's passes run through simd_dispatch, which compiles them (the hot row loops included) once per
// ISA clone (csrc/common/simd.h): results do not depend on the clone that runs.

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

// Horizontal taps of one image as separate arrays (flip folded into their order), so the interpolation
// loop below is a plain vectorizable loop with gathers: i0 (i1 is always i0 + 1, see SourceRow), w0, w1.
struct TapsX {
  std::vector<int> i0;
  std::vector<float> w0, w1;
  void fill(const Tap* taps, int W, bool flip) {
    i0.resize(W);
    w0.resize(W);
    w1.resize(W);
    for (int x = 0; x < W; ++x) {
      const Tap& t = taps[flip ? W - 1 - x : x];
      i0[x] = t.i0;
      w0[x] = t.w0;
      w1[x] = t.w1;
    }
  }
};

// Per-thread scratch: two planar (C, H, W) float images, a padded row, the Gaussian weights, cached
// interpolated rows and bilinear taps. Kept per thread across calls (thread_local): fresh buffers of this
// size come straight from mmap and page-fault on every call.
struct Scratch {
  std::vector<float> a, b, row, acc, weights, lerp;
  std::vector<const float*> taps;  // where each blur tap reads (sym_taps_row)
  int blur_r = 0;                  // live radius of the current sample's blur (blur_weights)
  std::vector<float> srow;         // one source row's crop span (source_row)
  std::vector<Tap> taps_x, taps_y;
  TapsX taps_xf;
  void fit(const Config& cfg) {
    a.resize(static_cast<size_t>(cfg.channels) * cfg.out_h * cfg.out_w);
    b.resize(a.size());
    row.resize(static_cast<size_t>(cfg.out_w) + 2 * cfg.radius);
    acc.resize(cfg.out_w);
    weights.resize(2 * cfg.radius + 1);
    taps.resize(2 * cfg.radius + 1);
    lerp.resize(6 * static_cast<size_t>(cfg.out_w));
    taps_x.resize(cfg.out_w);
    taps_y.resize(cfg.out_h);
  }
  // The weights of the live taps, centred like the full kernel's.
  const float* live_weights(const Config& cfg) const { return weights.data() + (cfg.radius - blur_r); }
};

// Finish (solarize, normalize) n values and store them at o[i * sx]. Its own multiversioned function with
// the solarize flag as a template argument, so the contiguous float32 case is one vector loop of a
// subtract, a multiply and a store (the output write is part of the last pass over each row).
template <bool kSolarize, typename O>
inline void finish_values(const float* x, int n, float thr, float m, float is, O* o, int64_t sx) {
  if (sx == 1) {
    for (int i = 0; i < n; ++i) o[i] = static_cast<O>(finish(x[i], kSolarize, thr, m, is));
  } else {
    for (int i = 0; i < n; ++i) o[i * sx] = static_cast<O>(finish(x[i], kSolarize, thr, m, is));
  }
}

template <typename O>
SIMCLR_SIMD_CLONES void write_values(const float* x, int n, bool solarize, float thr, float m, float is, O* o,
                                     int64_t sx) {
  if (solarize) {
    finish_values<true>(x, n, thr, m, is, o, sx);
  } else {
    finish_values<false>(x, n, thr, m, is, o, sx);
  }
}

// Output row y, channel c, from n finished-color values.
template <typename O>
inline void write_row(O* out, const OutLayout& lay, int c, int y, const float* x, int n, const View& v,
                      const Config& cfg) {
  write_values(x, n, v.solarize, cfg.threshold, cfg.mean[c], cfg.inv_std[c], out + c * lay.sc + y * lay.sy, lay.sx);
}

// The color ops run a row at a time over planar channels, one op per loop (the op is loop-invariant), so
// the compiler vectorizes them; each element goes through the same header helpers as on the GPU.
struct Row {
  float* ch[3];
  int n;
};

// Its own function so that the three planes are known not to alias: the loop then vectorizes.
SIMCLR_SIMD_CLONES void hue_row(float* __restrict r, float* __restrict g, float* __restrict b, int n, float hue) {
  for (int i = 0; i < n; ++i) {
    float p[3] = {r[i], g[i], b[i]};
    adjust_hue(p, hue);
    r[i] = p[0];
    g[i] = p[1];
    b[i] = p[2];
  }
}

// One loop per op, the factor in a local and the planes __restrict: a store cannot alias the factor, so
// each op is a single vector loop over the row.
SIMCLR_SIMD_CLONES void brightness_row(float* __restrict x, int n, float f) {
  for (int i = 0; i < n; ++i) x[i] = clamp01(x[i] * f);
}

// clamp01(f * x + (1 - f) * mean), the loop-invariant second term computed once (the same float value).
SIMCLR_SIMD_CLONES void contrast_row(float* __restrict x, int n, float f, float offset) {
  for (int i = 0; i < n; ++i) x[i] = clamp01(f * x[i] + offset);
}

SIMCLR_SIMD_CLONES void saturation_row(float* __restrict r, float* __restrict g, float* __restrict b, int n, float f) {
  const float f1 = 1.f - f;
  for (int i = 0; i < n; ++i) {
    const float l = kGrayR * r[i] + kGrayG * g[i] + kGrayB * b[i];
    r[i] = clamp01(f * r[i] + f1 * l);
    g[i] = clamp01(f * g[i] + f1 * l);
    b[i] = clamp01(f * b[i] + f1 * l);
  }
}

inline void jitter_row(int op, const Row& row, int C, const View& v, float mean) {
  switch (op) {
    case kOpBrightness:
      for (int c = 0; c < C; ++c) brightness_row(row.ch[c], row.n, v.brightness);
      break;
    case kOpContrast:
      for (int c = 0; c < C; ++c) contrast_row(row.ch[c], row.n, v.contrast, (1.f - v.contrast) * mean);
      break;
    case kOpSaturation:
      if (C == 3) saturation_row(row.ch[0], row.ch[1], row.ch[2], row.n, v.saturation);
      break;
    default:
      if (C == 3 && v.hue != 0.f) hue_row(row.ch[0], row.ch[1], row.ch[2], row.n, v.hue);  // as apply_jitter_op
      break;
  }
}

SIMCLR_SIMD_CLONES void gray_row(const Row& row, int C) {
  if (C != 3) return;
  float* r = row.ch[0];
  float* g = row.ch[1];
  float* b = row.ch[2];
  for (int i = 0; i < row.n; ++i) r[i] = g[i] = b[i] = kGrayR * r[i] + kGrayG * g[i] + kGrayB * b[i];
}

// V floats as one GCC vector, loadable from any float address. V follows the clone that runs
// (simd_floats(): 16 is one AVX-512 register, 8 one AVX2 register, 4 one SSE / NEON register): a vector wider
// than the clone's registers is lowered through the stack, several times slower (the AVX2 clone's blur was
// 7x the AVX-512 one's with 16). The loops below compute each output element the same way whatever V.
template <int V>
struct FloatVec {
  typedef float type __attribute__((vector_size(4 * V), aligned(4), may_alias));
};
template <int V>
using Lanes = typename FloatVec<V>::type;

// The vector of V floats at p (a macro: a function returning a vector wider than the baseline's registers
// would have an ISA-dependent ABI).
#define SIMCLR_LOAD(V, p) (*reinterpret_cast<const Lanes<V>*>(p))

// Calls f(std::integral_constant<int, V>{}) with the vector width of the clone that runs.
template <typename F>
inline void with_simd_floats(F&& f) {
  switch (simd_floats()) {
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      f(std::integral_constant<int, 4>{});
      break;
  }
}

// Sum of the row's luma (the contrast mean's numerator) in 16 fixed lanes, element i in lane i % 16 (16 / V
// vectors of V), then the lanes and the tail in a fixed order: a serial float sum would be one dependent add
// per pixel, and this order does not depend on the ISA or the thread count.
template <int V>
SIMCLR_SIMD_CLONES double luma_row_sum(const Row& row, int C) {
  constexpr int L = 16, P = L / V;
  const int n = row.n;
  const float* r = row.ch[0];
  const float* g = row.ch[C == 3 ? 1 : 0];
  const float* b = row.ch[C == 3 ? 2 : 0];
  Lanes<V> acc[P] = {};
  float tail = 0.f;
  int i = 0;
  if (C == 3) {
    for (; i + L <= n; i += L) {
      for (int j = 0; j < P; ++j) {
        const int o = i + j * V;
        acc[j] += kGrayR * SIMCLR_LOAD(V, r + o) + kGrayG * SIMCLR_LOAD(V, g + o) + kGrayB * SIMCLR_LOAD(V, b + o);
      }
    }
    for (; i < n; ++i) tail += kGrayR * r[i] + kGrayG * g[i] + kGrayB * b[i];
  } else {
    for (; i + L <= n; i += L) {
      for (int j = 0; j < P; ++j) acc[j] += SIMCLR_LOAD(V, r + i + j * V);
    }
    for (; i < n; ++i) tail += r[i];
  }
  double sum = tail;
  for (int j = 0; j < P; ++j) {
    for (int l = 0; l < V; ++l) sum += acc[j][l];
  }
  return sum;
}

inline double luma_row_sum(const Row& row, int C) {
  double sum = 0.0;
  with_simd_floats([&](auto v) { sum = luma_row_sum<decltype(v)::value>(row, C); });
  return sum;
}

template <typename O>
inline void finish_row(const Row& row, int C, int y, const View& v, const Config& cfg, O* out, const OutLayout& lay) {
  for (int c = 0; c < C; ++c) write_row(out, lay, c, y, row.ch[c], row.n, v, cfg);
}

// The crop's span of one source row as floats (raw values, uint8 not yet scaled), one element longer than
// the crop: the copy of its last pixel there is what the clamped tap i1 = i0 = crop_w - 1 reads, so every
// tap reads (i0, i0 + 1) and the result is the same as with the clamped index.
SIMCLR_SIMD_CLONES void source_row(const uint8_t* p, int64_t sx, int n, float* f) {
  if (sx == 1) {
    for (int i = 0; i < n; ++i) f[i] = static_cast<float>(p[i]);
  } else {
    for (int i = 0; i < n; ++i) f[i] = static_cast<float>(p[i * sx]);
  }
  f[n] = f[n - 1];
}
SIMCLR_SIMD_CLONES void source_row(const float* p, int64_t sx, int n, float* f) {
  if (sx == 1) {
    std::memcpy(f, p, sizeof(float) * n);
  } else {
    for (int i = 0; i < n; ++i) f[i] = p[i * sx];
  }
  f[n] = f[n - 1];
}

// Horizontal half of the bilinear resampling of a source row: lerp_x of the header for every output x.
// Compilers emulate gathers with scalar extracts (slow on most cores, hence their default tuning), so the
// x86 version gathers explicitly, 8 outputs at a time; it computes w0 * a0 + w1 * a1 with separate
// multiplies and an add, exactly as the portable loop does.
inline void lerp_x_row_portable(const float* f, const int* i0, const float* w0, const float* w1, int x, int W,
                                float* o) {
  for (; x < W; ++x) o[x] = lerp_x(f[i0[x]], f[i0[x] + 1], Tap{i0[x], i0[x] + 1, w0[x], w1[x]});
}

#ifdef SIMCLR_X86_CLONES
__attribute__((target("avx2"))) void lerp_x_row_avx2(const float* f, const int* i0, const float* w0, const float* w1,
                                                     int W, float* o) {
  int x = 0;
  for (; x + 8 <= W; x += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + x));
    const __m256 a0 = _mm256_i32gather_ps(f, idx, 4);
    const __m256 a1 = _mm256_i32gather_ps(f + 1, idx, 4);
    const __m256 v =
        _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(w0 + x), a0), _mm256_mul_ps(_mm256_loadu_ps(w1 + x), a1));
    _mm256_storeu_ps(o + x, v);
  }
  lerp_x_row_portable(f, i0, w0, w1, x, W, o);
}

inline void lerp_x_row(const float* f, const int* i0, const float* w0, const float* w1, int W, float* o) {
  if (cpu_isa() >= CpuIsa::kAvx2) {
    lerp_x_row_avx2(f, i0, w0, w1, W, o);
  } else {
    lerp_x_row_portable(f, i0, w0, w1, 0, W, o);
  }
}
#else
inline void lerp_x_row(const float* f, const int* i0, const float* w0, const float* w1, int W, float* o) {
  lerp_x_row_portable(f, i0, w0, w1, 0, W, o);
}
#endif

// Vertical half: output row from the two horizontally interpolated source rows.
template <typename T>
SIMCLR_SIMD_CLONES void lerp_y_row(const float* top, const float* bot, int W, const Tap& ty, float* o) {
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
  const float* get(const Source<T>& src, const View& v, int c, int i, const TapsX& taps, int W, float* srow) {
    const int k = i & 1;
    if (index[c][k] != i) {
      source_row(src.base + c * src.sc + (v.top + i) * src.sy + v.left * src.sx, src.sx, v.crop_w, srow);
      lerp_x_row(srow, taps.i0.data(), taps.w0.data(), taps.w1.data(), W, buf[c][k]);
      index[c][k] = i;
    }
    return buf[c][k];
  }
};

// Normalized Gaussian weights of the sample (torchvision: softmax of -d^2 / (2 sigma^2)) over the full
// kernel, and the radius that the blur passes actually use: the outer taps whose weights add up to at most
// kBlurTailWeight (both sides together) are left out. Their contribution to a value in [0, 1] is below
// that bound (1.5e-8, a quarter of a float32 ulp at 0.5), far inside the parity tolerance, while small
// sigmas (0.1-2 is the paper's range for a 23-tap kernel) then cost a few taps instead of 23.
constexpr float kBlurTailWeight = 1.f / (1 << 26);

// Smallest radius whose left-out tails (weights w[0 .. r - radius - 1] and their mirror images) weigh at
// most kBlurTailWeight in all.
inline int live_blur_radius(const float* w, int r) {
  float tail = 0.f;
  int dropped = 0;
  while (dropped < r && tail + 2.f * w[dropped] <= kBlurTailWeight) tail += 2.f * w[dropped++];
  return r - dropped;
}

inline int blur_weights(const View& v, const Config& cfg, Scratch& s) {
  const int r = cfg.radius, k = 2 * r + 1;
  float total = 0.f;
  for (int t = 0; t < k; ++t) total += (s.weights[t] = gauss_tap(t - r, v.sigma));
  for (int t = 0; t < k; ++t) s.weights[t] /= total;
  return live_blur_radius(s.weights.data(), r);
}

// Symmetric Gaussian taps over n outputs: o[x] = w[r] * p[r][x] + sum_{t < r} w[t] * (p[t][x] + p[2r-t][x]),
// accumulated in this order (w[t] == w[2r-t] exactly, so pairing halves the multiplies). p[t] is where tap t
// reads: the same row shifted by t (horizontal) or the reflected row y + t - r (vertical). Outputs go in
// chunks whose accumulators stay in vector registers across all taps: one load per tap and
// input, one store per output, instead of a load and a store of the output per tap.

// NV vectors of V outputs starting at x: NV independent accumulators hide the add latency.
template <int V, int NV>
inline void sym_taps_chunk(const float* const* p, const float* w, int r, int x, float* o) {
  Lanes<V> a[NV];
  for (int j = 0; j < NV; ++j) a[j] = w[r] * SIMCLR_LOAD(V, p[r] + x + j * V);
  for (int t = 0; t < r; ++t) {
    const float* lo = p[t] + x;
    const float* hi = p[2 * r - t] + x;
    for (int j = 0; j < NV; ++j) a[j] += w[t] * (SIMCLR_LOAD(V, lo + j * V) + SIMCLR_LOAD(V, hi + j * V));
  }
  for (int j = 0; j < NV; ++j) *reinterpret_cast<Lanes<V>*>(o + x + j * V) = a[j];
}

template <int V>
SIMCLR_SIMD_CLONES void sym_taps_row(const float* const* p, const float* w, int r, int n, float* o) {
  int x = 0;
  for (; x + 4 * V <= n; x += 4 * V) sym_taps_chunk<V, 4>(p, w, r, x, o);
  for (; x + V <= n; x += V) sym_taps_chunk<V, 1>(p, w, r, x, o);
  for (; x < n; ++x) {  // the last n % V outputs, same order of operations
    float a = w[r] * p[r][x];
    for (int t = 0; t < r; ++t) a += w[t] * (p[t][x] + p[2 * r - t][x]);
    o[x] = a;
  }
}

inline void sym_taps_row(const float* const* p, const float* w, int r, int n, float* o) {
  with_simd_floats([&](auto v) { sym_taps_row<decltype(v)::value>(p, w, r, n, o); });
}

// Horizontal blur of a finished color row (still in L1) into row y of s.b, with reflect padding, over the
// live radius s.blur_r (blur_weights).
inline void hblur_row(const Row& in, int y, int C, const Config& cfg, Scratch& s) {
  const int W = cfg.out_w, r = s.blur_r;
  const int64_t hw = static_cast<int64_t>(cfg.out_h) * W;
  float* row = s.row.data();
  for (int t = 0; t <= 2 * r; ++t) s.taps[t] = row + t;
  for (int c = 0; c < C; ++c) {
    const float* x_in = in.ch[c];
    for (int i = 0; i < r; ++i) row[i] = x_in[reflect(i - r, W)];
    std::memcpy(row + r, x_in, sizeof(float) * W);
    for (int i = W + r; i < W + 2 * r; ++i) row[i] = x_in[reflect(i - r, W)];
    sym_taps_row(s.taps.data(), s.live_weights(cfg), r, W, s.b.data() + c * hw + static_cast<int64_t>(y) * W);
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
  if (v.blur) s.blur_r = blur_weights(v, cfg, s);
  double luma_sum = 0.0;
  // Without rotation, output row y reads two source rows: one loop per channel over precomputed taps
  // (flip folded into their order) instead of the per-pixel inverse mapping.
  RowCache cache;
  if (!v.rotate) {
    s.taps_xf.fill(s.taps_x.data(), W, v.flip);
    s.srow.resize(static_cast<size_t>(v.crop_w) + 1);
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
        const float* top = cache.get(src, v, c, ty.i0, s.taps_xf, W, s.srow.data());
        const float* bot = cache.get(src, v, c, ty.i1, s.taps_xf, W, s.srow.data());
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

// Pass 3: vertical blur of s.b (reflect padding) a row at a time; each finished row is solarized,
// normalized and written.
template <typename O>
void vblur_pass(const View& v, const Config& cfg, Scratch& s, O* out, const OutLayout& lay) {
  const int H = cfg.out_h, W = cfg.out_w, C = cfg.channels, r = s.blur_r;
  const int64_t hw = static_cast<int64_t>(H) * W;
  float* acc = s.acc.data();
  for (int c = 0; c < C; ++c) {
    const float* hplane = s.b.data() + c * hw;
    for (int y = 0; y < H; ++y) {
      for (int t = 0; t <= 2 * r; ++t) s.taps[t] = hplane + static_cast<int64_t>(reflect(y + t - r, H)) * W;
      sym_taps_row(s.taps.data(), s.live_weights(cfg), r, W, acc);
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
      simd_dispatch([&] {
        color_passes<T, O>(s, v, cfg, scratch, o, lay);
        if (v.blur) vblur_pass<O>(v, cfg, scratch, o, lay);
      });
    }
  });
}

at::Tensor augment_forward_cpu(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes,
                               const at::Tensor& params, int64_t channels, bool src_channels_last, int64_t out_h,
                               int64_t out_w, int64_t blur_kernel, double solarize_threshold,
                               c10::ArrayRef<double> mean, c10::ArrayRef<double> std, at::ScalarType out_dtype,
                               bool out_channels_last) {
  const Config cfg = check_inputs(src, offsets, shapes, params, channels, out_h, out_w, blur_kernel, solarize_threshold,
                                  mean, std, out_dtype);
  at::Tensor out = at::empty({cfg.batch, channels, out_h, out_w}, src.options().dtype(out_dtype),
                             out_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (cfg.batch == 0) return out;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* shp = shapes.data_ptr<int64_t>();
  const float* prm = params.data_ptr<float>();
  const bool u8 = src.scalar_type() == at::kByte;
  dispatch_floating(out_dtype, "simclr_ext::augment (cpu)", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (u8) {
      run<uint8_t, scalar_t>(src, off, shp, prm, src_channels_last, cfg, out, out_channels_last);
    } else {
      run<float, scalar_t>(src, off, shp, prm, src_channels_last, cfg, out, out_channels_last);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(simclr_ext, CPU, m) { m.impl("augment", &augment_forward_cpu); }

}  // namespace augment
}  // namespace simclr_ext
