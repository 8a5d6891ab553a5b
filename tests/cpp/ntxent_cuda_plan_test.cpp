// Host checks of the CUDA kernels' tiling (csrc/ntxent/ntxent_cuda_plan.h), run by tests/test_ntxent_cuda_host.py
// on machines without a GPU: every launch choice and index map the kernels use, checked exhaustively
// over the shapes and dtypes the kernels accept. Prints "ok" and exits 0, or names the first failure.
#include "ntxent/ntxent_cuda_plan.h"

#include <cstdlib>
#include <vector>

#include "check.h"
#include "ntxent/ntxent.h"

using namespace simclr_ext::ntxent;
using simclr_ext::ceil_div;  // csrc/common/host_device.h

struct Types {
  const char* name;
  int64_t elem, acc, wmma_k;  // wmma_k = 0: SIMT only
};
// fp16 / bf16 (wmma k = 16), fp32 via TF32 (k = 8) or SIMT, fp64 SIMT.
static const Types kTypes[] = {{"half", 2, 4, 16}, {"float", 4, 4, 8}, {"double", 8, 8, 0}};

// Shared memory per block that sm_80 and sm_90 allow with the opt-in.
constexpr int64_t kSm80Smem = 163 * 1024;
constexpr int64_t kSm90Smem = 227 * 1024;

static void check_layout(const Types& t, bool with_grad) {
  const SmemLayout l = smem_layout(t.elem, t.acc, with_grad);
  const int64_t regions[] = {l.x, l.y, l.s, l.lab, l.p, l.yd, l.meta};
  for (int64_t r : regions) {
    if (r < 0) continue;
    CHECK(r % kCudaSmemAlign == 0, "%s: region at %lld not %lld-aligned", t.name, (long long)r,
          (long long)kCudaSmemAlign);
    CHECK(r < l.total, "%s: region at %lld past the total %lld", t.name, (long long)r, (long long)l.total);
  }
  // Regions are laid out in order and do not overlap.
  CHECK(l.y >= l.x + kCudaTile * l.ld_in * t.elem, "%s: x overlaps y", t.name);
  CHECK(l.s >= l.y + kCudaTile * l.ld_in * t.elem, "%s: y overlaps s", t.name);
  CHECK(l.lab >= l.s + kCudaTile * l.ld_s * t.acc, "%s: s overlaps lab", t.name);
  if (with_grad) {
    CHECK(l.p >= l.lab + kCudaTile * 8, "%s: lab overlaps p", t.name);
    CHECK(l.yd >= l.p + kCudaTile * l.ld_p * t.elem, "%s: p overlaps yd", t.name);
    CHECK(l.meta >= l.yd + kCudaTile * l.ld_yd * t.elem, "%s: yd overlaps meta", t.name);
    CHECK(l.total >= l.meta + 3 * kCudaTile * t.acc, "%s: meta past the end", t.name);
  } else {
    CHECK(l.p < 0 && l.yd < 0 && l.meta < 0, "%s: forward layout has backward regions", t.name);
    CHECK(l.total >= l.lab + kCudaTile * 8, "%s: lab past the end", t.name);
  }
  CHECK(l.total <= kSm80Smem && l.total <= kSm90Smem, "%s: %lld bytes of shared memory", t.name, (long long)l.total);
  // Rows are 16-byte multiples (uint4 copies); the smem padding keeps that.
  CHECK(
      l.ld_in * t.elem % 16 == 0 && l.ld_p * t.elem % 16 == 0 && l.ld_yd * t.elem % 16 == 0 && l.ld_s * t.acc % 16 == 0,
      "%s: a row stride is not a multiple of 16 bytes", t.name);
  CHECK(l.ld_in >= score_chunk(t.elem) && l.ld_p >= kCudaTile && l.ld_yd >= output_chunk(t.acc) && l.ld_s >= kCudaTile,
        "%s: a row stride is shorter than its row", t.name);
  if (t.wmma_k) {
    // wmma: ldm a multiple of 16 bytes, every fragment pointer 32-byte aligned. Fragment pointers are
    // region + (16 a) rows + (16 b or wmma_k b) columns.
    const int64_t lds[] = {l.ld_in * t.elem, l.ld_p * t.elem, l.ld_yd * t.elem, l.ld_s * 4};
    for (int64_t ld_bytes : lds) {
      CHECK(ld_bytes % 16 == 0, "%s: wmma ldm of %lld bytes", t.name, (long long)ld_bytes);
      CHECK(16 * ld_bytes % 32 == 0, "%s: 16 rows of %lld bytes break 32-byte alignment", t.name, (long long)ld_bytes);
      CHECK(t.wmma_k * (t.elem == 2 ? 2 : 4) % 32 == 0, "%s: a k step breaks 32-byte alignment", t.name);
    }
    // The yd operand is read at row kk (a multiple of the k step): kk rows must keep the alignment.
    CHECK(t.wmma_k * l.ld_yd * t.elem % 32 == 0, "%s: yd rows at k steps misaligned", t.name);
  }
  // No register array in the kernels may depend on a runtime value: the chunk sizes are fixed.
  CHECK(score_chunk(t.elem) % kCudaDimAlign == 0 && output_chunk(t.acc) % kCudaDimAlign == 0,
        "%s: chunks are not multiples of the D padding", t.name);
}

static void check_maps() {
  // strip_row / strip_col: the 32 lanes x 32 steps cover the 16 x kCudaTile strip exactly once.
  std::vector<int> seen(16 * kCudaTile, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int c = 0; c < 32; ++c) {
      const int r = strip_row(lane), col = strip_col(lane, c);
      CHECK(r >= 0 && r < 16 && col >= 0 && col < kCudaTile, "strip map out of range");
      if (r >= 0 && r < 16 && col >= 0 && col < kCudaTile) ++seen[r * kCudaTile + col];
    }
  }
  for (int v : seen) CHECK(v == 1, "strip map covers an element %d times", v);
  // Lanes l and l ^ 16 serve the same row (the kernels combine them with __shfl_xor_sync(..., 16)).
  for (int lane = 0; lane < 32; ++lane) CHECK(strip_row(lane) == strip_row(lane ^ 16), "lane pair");
  // At each step the 32 lanes read 32 distinct banks of the float score strip (no 2-way conflict between the
  // halves), and write 32 distinct banks of a float32 dL/dcos strip (TF32 and exact fp32 paths).
  for (const int64_t ld : {smem_layout(2, 4, true).ld_s, smem_layout(4, 4, true).ld_p}) {
    for (int c = 0; c < 32; ++c) {
      unsigned banks = 0;
      for (int lane = 0; lane < 32; ++lane) banks |= 1u << ((strip_row(lane) * ld + strip_col(lane, c)) % 32);
      CHECK(__builtin_popcount(banks) == 32, "strip accesses at step %d (row stride %lld) fall on %d banks", c,
            static_cast<long long>(ld), __builtin_popcount(banks));
    }
  }
  // simt_row / simt_col: 32 lanes x 4 rows x (cols / 8) columns cover a 16 x cols patch exactly once.
  for (int64_t cols : {kCudaTile, output_chunk(4), output_chunk(8)}) {
    std::vector<int> cover(16 * cols, 0);
    for (int lane = 0; lane < 32; ++lane) {
      for (int r = 0; r < 4; ++r) {
        for (int c = 0; c < cols / 8; ++c) {
          const int row = simt_row(lane, r), col = simt_col(lane, c);
          CHECK(row < 16 && col < cols, "simt map out of range");
          if (row < 16 && col < cols) ++cover[row * cols + col];
        }
      }
    }
    for (int v : cover) CHECK(v == 1, "simt map covers an element %d times (cols %lld)", v, (long long)cols);
    // A column c < width is written only when 8 c' < width for its step c': widths are multiples of 32.
    for (int64_t width = kCudaDimAlign; width <= cols; width += kCudaDimAlign) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int c = 0; c < cols / 8; ++c) CHECK((8 * c < width) == (simt_col(lane, c) < width), "simt width guard");
      }
    }
  }
  CHECK(kCudaThreads == 32 * kCudaWarps && 16 * kCudaWarps == kCudaTile, "a warp owns 16 rows of the tile");
}

static void check_plans() {
  const int64_t sizes[] = {1, 2, 3, 31, 63, 64, 65, 127, 129, 1000, 4096, 65536, 262144, 3000000000LL};
  const int64_t dims[] = {1, 3, 16, 31, 32, 33, 64, 127, 128, 129, 130, 256, 300, 512, 1000, 2048, 2049, 4096};
  for (const Types& t : kTypes) {
    check_layout(t, false);
    check_layout(t, true);
    for (int64_t m : sizes) {
      for (int64_t d : dims) {
        const int64_t l = m == 1 ? 2 : m + 7;
        for (int64_t sms : {1, 108, 132}) {
          const CudaPlan p = make_cuda_plan(m, l, d, t.elem, t.acc, sms);
          // Splits of the streamed tiles: within bounds, each non-empty, together every tile once.
          const int64_t split_cases[][2] = {
              {p.splits_fwd, p.tiles_k}, {p.splits_dq, p.tiles_k}, {p.splits_dk, p.tiles_q}};
          for (const auto& sc : split_cases) {
            const int64_t splits = sc[0], tiles = sc[1];
            CHECK(splits >= 1 && splits <= kCudaMaxSplits && splits <= tiles, "%lld splits of %lld tiles",
                  (long long)splits, (long long)tiles);
            CHECK(split_begin(tiles, splits, 0) == 0 && split_begin(tiles, splits, splits) == tiles, "split ends");
            for (int64_t sp = 0; sp < splits; ++sp) {
              CHECK(split_begin(tiles, splits, sp + 1) > split_begin(tiles, splits, sp), "split %lld is empty",
                    (long long)sp);
            }
          }
          // Splits only fill the machine: a launch that already gives each SM its blocks is not split.
          CHECK(p.grid_q < fwd_blocks_per_sm(t.elem) * sms || p.splits_fwd == 1, "forward split without need");
          CHECK(p.grid_q * p.out_chunks < bwd_blocks_per_sm(t.elem) * sms || p.splits_dq == 1, "dQ split without need");
          CHECK(p.rows_q >= m && p.rows_q % kCudaTile == 0 && p.rows_q - m < kCudaTile, "rows_q %lld for %lld",
                (long long)p.rows_q, (long long)m);
          CHECK(p.rows_k >= l && p.rows_k % kCudaTile == 0 && p.rows_k - l < kCudaTile, "rows_k");
          CHECK(p.dim >= d && p.dim % kCudaDimAlign == 0 && p.dim - d < kCudaDimAlign, "dim %lld for %lld",
                (long long)p.dim, (long long)d);
          CHECK(p.grid_q * kCudaTile == p.rows_q && p.grid_k * kCudaTile == p.rows_k, "grids cover the rows");
          CHECK(p.grid_q <= 2147483647LL && p.out_chunks <= 65535, "grid limits (x < 2^31, y < 65536)");
          CHECK(p.norm_grid_q * kCudaNormRowsPerBlock >= p.rows_q &&
                    (p.norm_grid_q - 1) * kCudaNormRowsPerBlock < p.rows_q,
                "normalize grid");
          // Chunks of D: positive multiples of the padding that add up to the padded D.
          for (int64_t chunk : {score_chunk(t.elem), output_chunk(t.acc)}) {
            const int64_t n = ceil_div(p.dim, chunk);
            int64_t total = 0;
            for (int64_t c = 0; c < n; ++c) {
              const int64_t w = chunk_width(p.dim, chunk, c);
              CHECK(w > 0 && w <= chunk && w % kCudaDimAlign == 0, "chunk %lld of %lld has width %lld", (long long)c,
                    (long long)p.dim, (long long)w);
              if (t.wmma_k) CHECK(w % t.wmma_k == 0 && w % 16 == 0, "chunk width vs wmma steps");
              total += w;
            }
            CHECK(total == p.dim, "chunks add up to %lld, not %lld", (long long)total, (long long)p.dim);
          }
          CHECK(p.out_chunks == ceil_div(p.dim, output_chunk(t.acc)), "out_chunks");
          if (p.score_chunks == 1) {
            // The backward then reads its output chunk from the score tile of the other rows.
            const SmemLayout lay = smem_layout(t.elem, t.acc, true);
            CHECK(p.out_chunks == 1 && chunk_width(p.dim, output_chunk(t.acc), 0) == p.dim && p.dim <= lay.ld_in,
                  "single score chunk: the output chunk must be all of D (dim %lld)", (long long)p.dim);
            if (t.wmma_k) CHECK(t.wmma_k * lay.ld_in * t.elem % 32 == 0, "score tile rows at k steps misaligned");
          }
          CHECK(p.smem_fwd == smem_layout(t.elem, t.acc, false).total &&
                    p.smem_bwd == smem_layout(t.elem, t.acc, true).total,
                "plan smem");
          // The blocks per SM the split plan and the __launch_bounds__ assume fit an H100's shared memory.
          CHECK(p.smem_fwd * fwd_blocks_per_sm(t.elem) <= kSm90Smem &&
                    p.smem_bwd * bwd_blocks_per_sm(t.elem) <= kSm90Smem,
                "%lld forward / %lld backward blocks per SM do not fit (%lld / %lld bytes each)",
                (long long)fwd_blocks_per_sm(t.elem), (long long)bwd_blocks_per_sm(t.elem), (long long)p.smem_fwd,
                (long long)p.smem_bwd);
          // Byte offsets of the largest element index stay in 64 bits (the kernels index with int64_t).
          CHECK((double)p.rows_k * (double)p.dim * 8.0 * (double)p.splits_dk < 9.2e18, "64-bit offsets");
        }
      }
    }
  }
  // tile_needs_mask: a tile it lets through unmasked holds no padding row and no own key of the block's rows,
  // for queries or keys as the own rows (brute force over block / tile pairs and offsets).
  for (int64_t other_n : {1, 63, 64, 65, 200, 256}) {
    for (int64_t off : {-1, 0, 1, 63, 64, 70, 130}) {
      for (int own_is_query = 0; own_is_query < 2; ++own_is_query) {
        for (int64_t row0 = 0; row0 < 320; row0 += kCudaTile) {
          for (int64_t col0 = 0; col0 < other_n; col0 += kCudaTile) {
            if (tile_needs_mask(row0, col0, other_n, off, own_is_query)) continue;
            for (int64_t a = row0; a < row0 + kCudaTile; ++a) {
              for (int64_t b = col0; b < col0 + kCudaTile; ++b) {
                const bool self = off >= 0 && (own_is_query ? b == a + off : a == b + off);
                CHECK(b < other_n && !self, "tile (%lld, %lld) of %lld, offset %lld unmasked at (%lld, %lld)",
                      (long long)row0, (long long)col0, (long long)other_n, (long long)off, (long long)a, (long long)b);
              }
            }
          }
        }
      }
    }
  }
  // Interior tiles really skip the tests: with self_offset -1 only the last tile is masked.
  CHECK(!tile_needs_mask(0, 64, 256, -1, true) && tile_needs_mask(0, 192, 250, -1, true) &&
            tile_needs_mask(128, 128, 1024, 0, true) && !tile_needs_mask(128, 256, 1024, 0, true),
        "tile_needs_mask on interior, last and diagonal tiles");
  // The SimCLR sizes of the issue: 2N = 65536, D = 128 and 2N = 262144 fit the launch limits.
  const CudaPlan big = make_cuda_plan(262144, 262144, 128, 2, 4, 132);
  CHECK(big.grid_q == 4096 && big.out_chunks == 1 && big.dim == 128 && big.splits_fwd == 1 && big.splits_dq == 1,
        "2N = 262144, D = 128 plan");
  // 2N = 16384 on an H100 (132 SMs): 256 row tiles, split to fill 4 (forward) / 2 (backward) blocks per SM.
  const CudaPlan mid = make_cuda_plan(16384, 16384, 128, 2, 4, 132);
  CHECK(mid.grid_q == 256 && mid.splits_fwd == 3 && mid.splits_dq == 2 && mid.splits_dk == 2,
        "2N = 16384 plan: splits %lld %lld %lld", (long long)mid.splits_fwd, (long long)mid.splits_dq,
        (long long)mid.splits_dk);
  const CudaPlan wide = make_cuda_plan(100, 100, 2048, 2, 4, 132);
  CHECK(wide.out_chunks == 16 && ceil_div(wide.dim, score_chunk(2)) == 16, "D = 2048 plan");
}

static void check_online_lse() {
  // Merging tiles in any split gives the log-sum-exp of the whole stream; empty tiles are skipped.
  const double xs[] = {0.3, -2.0, 5.0, 4.9, -30.0, 1e-3, 2.5};
  double ref_max = -1e300;
  for (double x : xs) ref_max = x > ref_max ? x : ref_max;
  double ref_sum = 0;
  for (double x : xs) ref_sum += std::exp(x - ref_max);
  const double ref = ref_max + std::log(ref_sum);
  for (int split = 1; split <= 7; ++split) {
    OnlineLSE<double> run = OnlineLSE<double>::empty();
    run.merge(0.0, 0.0);  // an empty tile
    for (int start = 0; start < 7; start += split) {
      double m = -1e300, s = 0;
      for (int i = start; i < start + split && i < 7; ++i) m = xs[i] > m ? xs[i] : m;
      for (int i = start; i < start + split && i < 7; ++i) s += std::exp(xs[i] - m);
      run.merge(m, s);
    }
    CHECK(std::fabs(run.value() - ref) < 1e-12, "online lse split %d: %g vs %g", split, run.value(), ref);
  }
  CHECK(std::isinf(OnlineLSE<double>::empty().value()) && OnlineLSE<double>::empty().value() < 0, "empty lse");
}

static void check_pow2_scale() {
  // A power of two in (m / 2, m] for every positive finite m, subnormals and the largest included.
  const double ms[] = {1e-300, 3e-310, 1.5e-5, 0.25, 0.3, 1.0, 7.0, 1e300, 1.7976931348623157e308};
  for (double m : ms) {
    const double s = pow2_scale(m);
    int e = 0;
    CHECK(std::frexp(s, &e) == 0.5 && s <= m && 2 * s > m, "pow2_scale(%g) = %g", m, s);
  }
  const float mf[] = {1e-40f, 1.5e-5f, 0.5f, 1.0f, 3e38f, 3.4028235e38f};
  for (float m : mf) {
    const float s = pow2_scale(m);
    CHECK(s <= m && 2.0 * s > m && s == std::ldexp(1.0f, std::ilogb(s)), "pow2_scale(%gf) = %g", (double)m, (double)s);
  }
  CHECK(pow2_scale(0.0) == 1.0 && pow2_scale(-2.0) == 1.0 && pow2_scale(std::nan("")) == 1.0 &&
            pow2_scale(INFINITY) == 1.0 && pow2_scale(0.0f) == 1.0f,
        "pow2_scale of 0, negative, NaN, inf");
  // Dividing by it is exact: (x / s) * s == x for any x, and |dL/dcos| / s <= 1 when m bounds it.
  const double x = 0.123456789012345;
  CHECK((x / pow2_scale(0.3)) * pow2_scale(0.3) == x, "scaling is exact");
}

static void check_clamped_norm() {
  // x / clamped_norm(x^2) is exactly +-1 for one-element rows (the D = 1 backward cancels exactly),
  // and the clamp is F.normalize's eps.
  const float xs[] = {3.0f, -0.1f, 1e-3f, 7.5e-20f, 123456.7f};
  for (float x : xs) {
    const float n = clamped_norm(x * x);
    CHECK(std::fabs(x / n) == 1.0f || n == (float)kNormEps, "x / |x| for x = %g is %.9g", (double)x, (double)(x / n));
  }
  CHECK(clamped_norm(0.0) == kNormEps && clamped_norm(4.0) == 2.0, "clamped_norm");
  CHECK(norm_clamped(0.0) && norm_clamped(1e-26) && !norm_clamped(1.0), "norm_clamped agrees with the clamp");
}

static void check_symmetric_grad() {
  // The symmetric backward's H_ij (one recomputed cosine, both rows' factors) is dS_ij + dS_ji as the
  // general passes compute them, for rows with and without positives, positive pairs or not.
  const double inv_t = 1.0 / 0.07;
  const double cs[] = {-0.9, -0.1, 0.0, 0.35, 0.999};
  const double lse_gaps[] = {0.0, 0.7, 9.0};  // lse - s >= 0: a softmax probability in (0, 1]
  const int nps[] = {0, 1, 3};
  for (double c : cs) {
    for (double gap_i : lse_gaps) {
      for (double gap_j : lse_gaps) {
        const double lse_i = logit(c, inv_t) + gap_i, lse_j = logit(c, inv_t) + gap_j;
        for (int np_i : nps) {
          for (int np_j : nps) {
            for (bool pos : {false, true}) {
              const double g_i = 0.37, g_j = -1.25;
              const RowFactors<double> fi = row_factors(g_i, lse_i, np_i, inv_t);
              const RowFactors<double> fj = row_factors(g_j, lse_j, np_j, inv_t);
              const double h = symmetric_cosine_grad(c, inv_t, fi, fj, pos);
              double want = 0;
              if (np_i > 0) want += cosine_grad(c, inv_t, lse_i, g_i, pos, 1.0 / np_i);
              if (np_j > 0) want += cosine_grad(c, inv_t, lse_j, g_j, pos, 1.0 / np_j);
              CHECK(std::fabs(h - want) <= 1e-12 * (1 + std::fabs(want)),
                    "H(c=%g, np %d %d, pos %d) = %.17g, want %.17g", c, np_i, np_j, (int)pos, h, want);
              // |H| <= |g_i| / t + |g_j| / t: the bound the CUDA kernel's operand scaling uses (2 max |g| / t).
              CHECK(std::fabs(h) <= (std::fabs(g_i) + std::fabs(g_j)) * inv_t * (1 + 1e-12), "H bound");
            }
          }
        }
      }
    }
  }
  // A row without positives contributes exactly nothing, even where its forward lse is -inf (no keys).
  const RowFactors<float> empty = row_factors(2.0f, -INFINITY, 0, 10.0f);
  const RowFactors<float> other = row_factors(1.0f, 2.0f, 1, 10.0f);
  const float h = symmetric_cosine_grad(0.5f, 10.0f, empty, other, false);
  CHECK(h == cosine_grad(0.5f, 10.0f, 2.0f, 1.0f, false, 1.0f), "a row without positives adds exactly 0");
  // A pair whose softmax is exactly 1 in both directions (two rows, each the other's only key and positive)
  // cancels exactly: H = 0.
  const float s = logit(0.25f, 2.0f);
  const RowFactors<float> a = row_factors(0.3f, s, 1, 2.0f), b = row_factors(0.7f, s, 1, 2.0f);
  CHECK(symmetric_cosine_grad(0.25f, 2.0f, a, b, true) == 0.0f, "exact cancellation");
}

int main() {
  check_clamped_norm();
  check_pow2_scale();
  check_maps();
  check_plans();
  check_online_lse();
  check_symmetric_grad();
  return check_summary();
}
