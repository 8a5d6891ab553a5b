// Host checks of the CUDA augmentation kernels' launch plan (csrc/augment/augment_cuda_plan.h), run by
// tests/test_augment_cuda_host.py on machines without a GPU: tilings cover every output pixel once, the
// blur's shared-memory layout holds every index the kernel touches, the tile search picks the largest
// tile that fits (and refuses exactly when none does), and the "does any sample blur" test agrees with
// the kernel's own decoding of the parameters. Prints "ok" and exits 0, or names the first failures.
#include "augment/augment_cuda_plan.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "check.h"

using namespace simclr_ext::augment;

// Opt-in shared memory per block of sm_80 and sm_90, and the default 48 KiB, each less a static part as
// large as the kernel's per-block sample could ever be.
constexpr int64_t kLimits[] = {48 * 1024 - 256, 163 * 1024 - 256, 227 * 1024 - 256};

// Every output pixel of an out_h x out_w sample lies in exactly one tile, and every tile starts inside.
static void check_tiling(int out_h, int out_w, int tile) {
  const Tiling g = make_tiling(out_h, out_w, tile);
  CHECK(g.tile == tile && g.tiles_x * tile >= out_w && (g.tiles_x - 1) * tile < out_w, "%dx%d tile %d: tiles_x %d",
        out_h, out_w, tile, g.tiles_x);
  std::vector<int> hits(static_cast<size_t>(out_h) * out_w, 0);
  for (int64_t t = 0; t < g.tiles; ++t) {
    int x0, y0;
    tile_origin(g, t, &x0, &y0);
    CHECK(x0 >= 0 && y0 >= 0 && x0 < out_w && y0 < out_h, "%dx%d tile %d: tile %lld starts at (%d, %d)", out_h, out_w,
          tile, (long long)t, x0, y0);
    for (int i = 0; i < tile * tile; ++i) {  // the kernels' loop over a tile
      const int y = y0 + i / tile, x = x0 + i % tile;
      if (y < out_h && x < out_w) ++hits[static_cast<size_t>(y) * out_w + x];
    }
  }
  for (size_t p = 0; p < hits.size(); ++p) {
    CHECK(hits[p] == 1, "%dx%d tile %d: pixel %zu covered %d times", out_h, out_w, tile, p, hits[p]);
  }
}

// The regions hold every index the blur path uses and do not overlap.
static void check_layout(int channels, int tile, int radius) {
  const BlurLayout l = blur_layout(channels, tile, radius);
  const int k = 2 * radius + 1, ext = tile + 2 * radius;
  CHECK(l.ext == ext, "ext %d != %d", l.ext, ext);
  CHECK(l.weights == 0 && l.weights + k <= l.sum && l.sum < l.tin, "C=%d r=%d: weights/sum overlap", channels, radius);
  // Haloed tile: (c * ext + ly) * ext + lx for ly, lx < ext; horizontal pass: (c * ext + ly) * tile + lx,
  // read back down a column up to ly + 2r < ext.
  const int64_t tin_last = (static_cast<int64_t>(channels - 1) * ext + ext - 1) * ext + ext - 1;
  const int64_t th_last = (static_cast<int64_t>(channels - 1) * ext + ext - 1) * tile + tile - 1;
  CHECK(l.tin + tin_last < l.th, "C=%d tile %d r=%d: haloed tile overlaps the horizontal pass", channels, tile, radius);
  CHECK(l.th + th_last < l.total, "C=%d tile %d r=%d: horizontal pass past the end", channels, tile, radius);
  CHECK(l.th + th_last == l.total - 1 && l.tin + tin_last == l.th - 1, "C=%d tile %d r=%d: layout has gaps", channels,
        tile, radius);
  CHECK(blur_smem_bytes(channels, tile, radius) == sizeof(float) * static_cast<size_t>(l.total),
        "C=%d tile %d r=%d: bytes", channels, tile, radius);
  // Every region starts 4-byte aligned by construction (float offsets); the kernel reads no wider type.
}

static void check_plan(int channels, int radius, int64_t limit) {
  const BlurPlan p = plan_blur(channels, radius, limit);
  CHECK(p.tile == 8 || p.tile == 16 || p.tile == 32, "tile %d", p.tile);
  CHECK(p.bytes == blur_smem_bytes(channels, p.tile, radius), "C=%d r=%d: bytes of another tile", channels, radius);
  const bool any_fits = limit >= 0 && blur_smem_bytes(channels, kMinTile, radius) <= static_cast<size_t>(limit);
  CHECK(p.fits == any_fits, "C=%d r=%d limit %lld: fits %d but the smallest tile %s", channels, radius,
        (long long)limit, p.fits, any_fits ? "fits" : "does not fit");
  if (p.fits) {
    CHECK(p.bytes <= static_cast<size_t>(limit), "C=%d r=%d: %zu bytes > limit %lld", channels, radius, p.bytes,
          (long long)limit);
    if (p.tile < kMaxTile) {
      CHECK(blur_smem_bytes(channels, 2 * p.tile, radius) > static_cast<size_t>(limit),
            "C=%d r=%d limit %lld: tile %d chosen though %d fits", channels, radius, (long long)limit, p.tile,
            2 * p.tile);
    }
  } else {
    CHECK(p.tile == kMinTile, "C=%d r=%d: no fit should end at the smallest tile, got %d", channels, radius, p.tile);
  }
}

// any_sample_blurs agrees with the kernel's decoding (load_view) on every row, including -0, NaN and
// denormal flags, wherever the one blurring sample sits.
static void check_any_blur() {
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  const float flags[] = {
      0.f, -0.f, 1.f, -1.f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::quiet_NaN(), 0.5f};
  for (int batch : {0, 1, 2, 7, 64}) {
    for (float flag : flags) {
      for (int at = 0; at < (batch > 0 ? batch : 1); ++at) {
        std::vector<float> params(static_cast<size_t>(batch) * kNumParams);
        for (float& x : params) x = unit(rng);
        bool expect = false;
        for (int b = 0; b < batch; ++b) {
          float* row = params.data() + static_cast<size_t>(b) * kNumParams;
          row[kBlur] = b == at ? flag : 0.f;
          row[kAngle] = 360.f * unit(rng);
          expect = expect || load_view(row).blur;
        }
        CHECK(any_sample_blurs(params.data(), batch) == expect, "batch %d, flag %g at %d: got %d", batch,
              static_cast<double>(flag), at, !expect);
        CHECK(expect == (batch > 0 && flag != 0.f), "batch %d flag %g: load_view disagrees with != 0", batch,
              static_cast<double>(flag));
      }
    }
  }
}

int main() {
  for (int tile : {8, 16, 32}) {
    for (int h = 1; h <= 70; h += 3) {
      for (int w = 1; w <= 70; w += 5) check_tiling(h, w, tile);
    }
    check_tiling(224, 224, tile);
    check_tiling(97, 129, tile);
  }
  for (int channels : {1, 3}) {
    for (int radius = 0; radius <= kMaxBlurKernel / 2; ++radius) {
      for (int tile : {8, 16, 32}) check_layout(channels, tile, radius);
      for (int64_t limit : kLimits) check_plan(channels, radius, limit);
      check_plan(channels, radius, 0);
      check_plan(channels, radius, -1);  // a static part larger than the device's whole limit
      // Exactly at and one byte below each tile's working set.
      for (int tile : {8, 16, 32}) {
        const int64_t need = static_cast<int64_t>(blur_smem_bytes(channels, tile, radius));
        check_plan(channels, radius, need);
        check_plan(channels, radius, need - 1);
        const BlurPlan at = plan_blur(channels, radius, need);
        CHECK(at.fits && at.tile >= tile, "C=%d r=%d: %lld bytes fit tile %d, plan chose %d (fits %d)", channels,
              radius, (long long)need, tile, at.tile, at.fits);
      }
    }
  }
  // The SimCLR presets' kernels (about 10% of the side) keep the largest tile on both architectures.
  for (int channels : {1, 3}) {
    for (int kernel : {3, 23, 45}) {
      for (int64_t limit : {kLimits[1], kLimits[2]}) {
        CHECK(plan_blur(channels, kernel / 2, limit).tile == kMaxTile, "C=%d kernel %d: tile %d", channels, kernel,
              plan_blur(channels, kernel / 2, limit).tile);
      }
    }
  }
  // The largest kernel the op accepts does not fit any device: it must be refused, not launched.
  CHECK(!plan_blur(1, kMaxBlurKernel / 2, kLimits[2]).fits, "kernel %d fits %lld bytes", kMaxBlurKernel,
        (long long)kLimits[2]);
  check_any_blur();
  return check_summary();
}
