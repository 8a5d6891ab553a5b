// Device code of the augmentation op's CUDA kernels: the per-launch constants, the per-block decoding of a
// sample and the three __global__ kernels (luma_partials, luma_means, augment_main). Their host side
// (launch plan, dispatch) is augment_cuda.cu, the only file that includes this one (hence the anonymous
// namespace); the tiling they follow is augment_cuda_plan.h, checked on the host by the CPU tests.
//   luma_partials: only for samples with jitter; geometry + the jitter ops before contrast, summing the
//                  luma of the tile (deterministic: one partial per tile, no atomics);
//   luma_means:    one thread per sample sums its partials in a fixed order (contrast's mean);
//   augment_main:  geometry + all color ops per pixel; without blur it finishes and writes at once; with
//                  blur it fills a haloed tile in shared memory (reflect padding), blurs it horizontally
//                  then vertically, and finishes and writes.
// Every block owns one TILE x TILE output tile of one sample (grid.x = samples x tiles) and recomputes
// rather than stores: the color pipeline is cheap next to a round trip through global memory, so the op
// reads the sources and writes the outputs, nothing else of image size. Thread 0 of each block decodes the
// block's sample (parameters, source, mean) into shared memory once.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "augment/augment.h"
#include "augment/augment_cuda_plan.h"
#include "common/cuda_device.cuh"

namespace simclr_ext {
namespace augment {
namespace {

constexpr int kThreads = 256;

// Per-launch constants, passed by value.
struct Launch {
  int channels, out_h, out_w, radius;
  Tiling g;
  bool src_cl;
  float threshold;
  float mean[3], inv_std[3];
  int64_t out_sb, out_sc, out_sy, out_sx;
};

template <typename T>
__device__ __forceinline__ Source<T> source_of(const T* src, const int64_t* offsets, const int64_t* shapes, int64_t b,
                                               const Launch& L) {
  const int64_t h = shapes[2 * b], w = shapes[2 * b + 1];
  Source<T> s;
  s.base = src + offsets[b];
  s.h = static_cast<int>(h);
  s.w = static_cast<int>(w);
  s.sc = L.src_cl ? 1 : h * w;
  s.sy = L.src_cl ? w * L.channels : w;
  s.sx = L.src_cl ? L.channels : 1;
  return s;
}

// The sample a block works on, decoded once per block (every block covers a tile of exactly one sample).
template <typename T>
struct BlockSample {
  View v;
  Source<T> s;
  float mean;  // contrast mean; 0 without jitter or before it is known
};

// Thread 0 decodes and every thread copies the result from shared memory into registers: load_view's
// double-precision fmod/cos/sin are too costly per thread. Each thread gets the values it used to compute
// itself (the same function on the same inputs), so the per-pixel arithmetic and its results do not change.
// means == nullptr: the mean is not known yet (luma pass). Contains a barrier: call from every thread.
template <typename T>
__device__ __forceinline__ void decode_sample(BlockSample<T>& out, const T* src, const int64_t* offsets,
                                              const int64_t* shapes, const float* params, const float* means, int64_t b,
                                              const Launch& L) {
  if (threadIdx.x == 0) {
    out.v = load_view(params + b * kNumParams);
    out.s = source_of(src, offsets, shapes, b, L);
    out.mean = means != nullptr && out.v.jitter ? means[b] : 0.f;
  }
  __syncthreads();
}

// Sum over the block; the result is valid in thread 0. blockDim.x == kThreads.
__device__ __forceinline__ float block_sum(float x, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared32[warp] = x;
  __syncthreads();
  x = 0.f;
  if (warp == 0) {
    x = lane < kThreads / 32 ? shared32[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads)
    luma_partials_kernel(const T* __restrict__ src, const int64_t* __restrict__ offsets,
                         const int64_t* __restrict__ shapes, const float* __restrict__ params,
                         float* __restrict__ partials, Launch L) {
  SIMCLR_STATIC_SHARED(float[32], shared32);
  SIMCLR_STATIC_SHARED(BlockSample<T>, sample);
  const int64_t b = blockIdx.x / L.g.tiles, t = blockIdx.x % L.g.tiles;
  decode_sample(sample, src, offsets, shapes, params, nullptr, b, L);
  const View v = sample.v;  // copies: registers, as when every thread decoded for itself
  if (!v.jitter) return;    // uniform over the block: no contrast, no mean needed
  const Source<T> s = sample.s;
  int x0, y0;
  tile_origin(L.g, t, &x0, &y0);
  const int tile = L.g.tile;
  float sum = 0.f;
  for (int i = threadIdx.x; i < tile * tile; i += kThreads) {
    const int y = y0 + i / tile, x = x0 + i % tile;
    if (y >= L.out_h || x >= L.out_w) continue;
    float p[3];
    sample_geometry(s, v, x, y, L.out_w, L.out_h, C, p);
    color_before_contrast(p, C, v);
    sum += luma(p, C);
  }
  sum = block_sum(sum, shared32);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

__global__ void luma_means_kernel(const float* __restrict__ partials, const float* __restrict__ params,
                                  float* __restrict__ means, int64_t batch, Launch L) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  if (params[b * kNumParams + kJitter] == 0.f) {
    means[b] = 0.f;
    return;
  }
  double sum = 0.0;
  for (int64_t t = 0; t < L.g.tiles; ++t) sum += partials[b * L.g.tiles + t];
  means[b] = static_cast<float>(sum / (static_cast<double>(L.out_h) * L.out_w));
}

template <int C, typename O>
__device__ __forceinline__ void write_pixel(O* out, const Launch& L, int64_t b, int y, int x, const float* p,
                                            bool solarize) {
  O* o = out + b * L.out_sb + static_cast<int64_t>(y) * L.out_sy + static_cast<int64_t>(x) * L.out_sx;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    o[c * L.out_sc] = static_cast<O>(finish(p[c], solarize, L.threshold, L.mean[c], L.inv_std[c]));
  }
}

template <int C, typename T>
__device__ __forceinline__ void colored_pixel(const Source<T>& s, const View& v, const Launch& L, float mean, int x,
                                              int y, float* p) {
  sample_geometry(s, v, x, y, L.out_w, L.out_h, C, p);
  color_before_contrast(p, C, v);
  color_from_contrast(p, C, v, mean);
}

template <typename T, typename O, int C>
__global__ void __launch_bounds__(kThreads)
    augment_main_kernel(const T* __restrict__ src, const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ shapes, const float* __restrict__ params,
                        const float* __restrict__ means, O* __restrict__ out, Launch L) {
  SIMCLR_DYNAMIC_SHARED(float, smem);  // blur path only; no dynamic shared memory when no sample blurs
  SIMCLR_STATIC_SHARED(BlockSample<T>, sample);
  const int64_t b = blockIdx.x / L.g.tiles, t = blockIdx.x % L.g.tiles;
  decode_sample(sample, src, offsets, shapes, params, means, b, L);
  const View v = sample.v;  // copies: registers, as when every thread decoded for itself
  const Source<T> s = sample.s;
  const float mean = sample.mean;
  int x0, y0;
  tile_origin(L.g, t, &x0, &y0);
  const int tile = L.g.tile;

  if (!v.blur) {
    for (int i = threadIdx.x; i < tile * tile; i += kThreads) {
      const int y = y0 + i / tile, x = x0 + i % tile;
      if (y >= L.out_h || x >= L.out_w) continue;
      float p[3];
      colored_pixel<C>(s, v, L, mean, x, y, p);
      write_pixel<C>(out, L, b, y, x, p, v.solarize);
    }
    return;
  }

  const BlurLayout lay = blur_layout(C, tile, L.radius);
  const int r = L.radius, k = 2 * r + 1, ext = lay.ext;
  float* w = smem + lay.weights;  // k weights
  float* w_sum = smem + lay.sum;  // their sum
  float* tin = smem + lay.tin;    // C x ext x ext colored pixels (haloed tile)
  float* th = smem + lay.th;      // C x ext x tile after the horizontal pass
  for (int i = threadIdx.x; i < k; i += kThreads) w[i] = gauss_tap(i - r, v.sigma);
  // Halo pixels past the last output row/column + r are never read; clamping keeps reflect() in range.
  for (int i = threadIdx.x; i < ext * ext; i += kThreads) {
    const int ly = i / ext, lx = i % ext;
    const int gy = reflect(min(y0 - r + ly, L.out_h - 1 + r), L.out_h);
    const int gx = reflect(min(x0 - r + lx, L.out_w - 1 + r), L.out_w);
    float p[3];
    colored_pixel<C>(s, v, L, mean, gx, gy, p);
    for (int c = 0; c < C; ++c) tin[(c * ext + ly) * ext + lx] = p[c];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < k; ++i) total += w[i];
    *w_sum = total;
  }
  __syncthreads();
  const float inv_total = 1.f / *w_sum;
  for (int i = threadIdx.x; i < k; i += kThreads) w[i] *= inv_total;
  __syncthreads();
  for (int i = threadIdx.x; i < ext * tile; i += kThreads) {
    const int ly = i / tile, lx = i % tile;
    for (int c = 0; c < C; ++c) {
      const float* row = tin + (c * ext + ly) * ext + lx;
      float acc = 0.f;
      for (int j = 0; j < k; ++j) acc += w[j] * row[j];
      th[(c * ext + ly) * tile + lx] = acc;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < tile * tile; i += kThreads) {
    const int ly = i / tile, lx = i % tile;
    const int y = y0 + ly, x = x0 + lx;
    if (y >= L.out_h || x >= L.out_w) continue;
    float p[3];
    for (int c = 0; c < C; ++c) {
      const float* col = th + (c * ext + ly) * tile + lx;
      float acc = 0.f;
      for (int j = 0; j < k; ++j) acc += w[j] * col[j * tile];
      p[c] = acc;
    }
    write_pixel<C>(out, L, b, y, x, p, v.solarize);
  }
}

}  // namespace
}  // namespace augment
}  // namespace simclr_ext
