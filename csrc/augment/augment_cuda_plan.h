// Launch plan of the CUDA augmentation kernels: the tiling of each sample, the blur path's shared-memory
// layout and tile size, and whether a batch needs the blur path at all. Integer logic only, in plain C++
// so tests/cpp/augment_cuda_plan_test.cpp checks it exhaustively without a GPU; the kernels take their
// index maps from the same SIMCLR_HD helpers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "augment/augment.h"

namespace simclr_ext {
namespace augment {

// Tiles are square, a power of two between these. Launches without blur and the contrast-mean partials
// always use kMaxTile, so a sample's mean (a sum of per-tile partials) is the same whatever the blur
// kernel, the device's shared memory or the other samples of the batch.
constexpr int kMaxTile = 32;
constexpr int kMinTile = 8;

// One sample split into tiles of tile x tile output pixels, tiles_x per row of tiles (row-major).
struct Tiling {
  int tile, tiles_x;
  int64_t tiles;  // per sample
};

inline Tiling make_tiling(int out_h, int out_w, int tile) {
  Tiling g;
  g.tile = tile;
  g.tiles_x = (out_w + tile - 1) / tile;
  g.tiles = static_cast<int64_t>(g.tiles_x) * ((out_h + tile - 1) / tile);
  return g;
}

// Output pixel of the top-left corner of tile t (0 <= t < g.tiles).
SIMCLR_HD void tile_origin(const Tiling& g, int64_t t, int* x0, int* y0) {
  *y0 = static_cast<int>(t / g.tiles_x) * g.tile;
  *x0 = static_cast<int>(t % g.tiles_x) * g.tile;
}

// The blur path's dynamic shared memory, offsets in floats: the k Gaussian weights (room for the largest
// kernel), their sum, the channels x ext x ext haloed tile of colored pixels, then the channels x ext x tile
// result of the horizontal pass (ext = tile + 2 radius).
struct BlurLayout {
  int ext;
  int64_t weights, sum, tin, th, total;
};

SIMCLR_HD BlurLayout blur_layout(int channels, int tile, int radius) {
  BlurLayout l;
  l.ext = tile + 2 * radius;
  l.weights = 0;
  l.sum = kMaxBlurKernel;
  l.tin = kMaxBlurKernel + 1;
  l.th = l.tin + static_cast<int64_t>(channels) * l.ext * l.ext;
  l.total = l.th + static_cast<int64_t>(channels) * l.ext * tile;
  return l;
}

inline size_t blur_smem_bytes(int channels, int tile, int radius) {
  return sizeof(float) * static_cast<size_t>(blur_layout(channels, tile, radius).total);
}

struct BlurPlan {
  int tile;
  size_t bytes;  // dynamic shared memory per block
  bool fits;     // false: even kMinTile needs more than the limit
};

// The largest tile whose blur working set fits `limit` bytes of dynamic shared memory (a bigger tile
// recomputes fewer halo pixels).
inline BlurPlan plan_blur(int channels, int radius, int64_t limit) {
  int tile = kMaxTile;
  while (tile > kMinTile && blur_smem_bytes(channels, tile, radius) > static_cast<uint64_t>(limit < 0 ? 0 : limit)) {
    tile /= 2;
  }
  BlurPlan p;
  p.tile = tile;
  p.bytes = blur_smem_bytes(channels, tile, radius);
  p.fits = limit >= 0 && p.bytes <= static_cast<uint64_t>(limit);
  return p;
}

// Whether any sample of a (batch, kNumParams) host parameter matrix blurs: the same test as load_view's
// View::blur, so a batch planned without the blur path never reaches it.
inline bool any_sample_blurs(const float* params, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    if (params[b * kNumParams + kBlur] != 0.f) return true;
  }
  return false;
}

}  // namespace augment
}  // namespace simclr_ext
