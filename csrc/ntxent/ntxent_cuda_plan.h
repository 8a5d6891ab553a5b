// Tiling and launch plan of the CUDA kernels of the contrastive op (ntxent_cuda_kernels.cuh,
// ntxent_cuda.cu). Host and device code with no CUDA dependency, so that the CPU tests check every launch
// choice and index map without a GPU (tests/cpp/ntxent_cuda_plan_test.cpp, run by
// tests/test_ntxent_cuda_host.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

namespace simclr_ext {
namespace ntxent {

// Normalized copies of q and k are written once per call into zero-padded buffers of
// padded_rows(n) x padded_dim(D) elements, so that the tile loops never test bounds and every
// shared-memory copy is 16-byte vectorized. One thread block of kCudaThreads (4 warps) owns kCudaTile
// rows of one side ("own": queries in forward and dQ, keys in dK) and streams kCudaTile-row tiles of the
// other side. Warp w owns rows [16 w, 16 w + 16) of the block's tile, for the score tile and for the
// gradient accumulators, so the score tile it writes to shared memory is read back by itself only.
// Scores are accumulated over D in chunks of score_chunk() elements (256 bytes of a row); the backward
// accumulates dX for output_chunk() columns of D per block (grid.y walks the chunks).
constexpr int64_t kCudaTile = 64;  // own rows per block = other rows per streamed tile
constexpr int kCudaWarps = 4;      // warp w owns rows [16 w, 16 w + 16)
constexpr int kCudaThreads = 32 * kCudaWarps;
constexpr int64_t kCudaDimAlign = 32;         // D is zero-padded to a multiple of this (elements)
constexpr int64_t kCudaSmemAlign = 128;       // every shared-memory region starts on this many bytes
constexpr int64_t kCudaNormRowsPerBlock = 8;  // normalize / finalize kernels: one warp per row

SIMCLR_HDC int64_t padded_rows(int64_t n) { return round_up(n, kCudaTile); }
SIMCLR_HDC int64_t padded_dim(int64_t d) { return round_up(d, kCudaDimAlign); }

// Elements of D per score chunk (256 bytes of a row) and shared-memory row padding (16 bytes), which
// keeps wmma's 32-byte fragment alignment and spreads rows over the banks.
SIMCLR_HDC int64_t score_chunk(int64_t elem_bytes) { return 256 / elem_bytes; }
SIMCLR_HDC int64_t smem_pad(int64_t elem_bytes) { return 16 / elem_bytes; }
// Columns of dX one backward block accumulates: 128 (float accumulators), 64 for double.
SIMCLR_HDC int64_t output_chunk(int64_t acc_bytes) { return acc_bytes == 8 ? 64 : 128; }
// Width of chunk c of a padded dimension cut into chunks of `chunk` (the last may be shorter; always a
// positive multiple of kCudaDimAlign when dim_padded is).
SIMCLR_HDC int64_t chunk_width(int64_t dim_padded, int64_t chunk, int64_t c) {
  const int64_t rest = dim_padded - c * chunk;
  return rest < chunk ? rest : chunk;
}

// Tile copies (global -> shared) move 16 bytes per thread and step and issue kCudaCopyBatch loads
// before their stores, so that a batch of loads is in flight at once rather than one.
constexpr int kCudaCopyBatch = 8;

// Shared-memory layout of the forward (with_grad = false) and backward kernels, in bytes from the
// start of the dynamic shared memory. Regions, each kCudaSmemAlign-aligned:
//   x   own rows, one score chunk      kCudaTile x (score_chunk + pad)       elem
//   y   other rows, one score chunk    kCudaTile x (score_chunk + pad)       elem
//   s   scores of the tile             kCudaTile x (kCudaTile + acc pad)     acc
//   lab other rows' labels             kCudaTile                             int64
//   (backward only)
//   p   dL/dcos of the tile            kCudaTile x (kCudaTile + pad)         elem
//   yd  other rows, one output chunk   kCudaTile x (output_chunk + pad)      elem
//   meta other rows' lse, grad, 1/npos 3 x kCudaTile                         acc
struct SmemLayout {
  int64_t ld_in, ld_s, ld_p, ld_yd;          // leading dimensions, in elements of the region
  int64_t x, y, s, lab, p, yd, meta, total;  // byte offsets and total size
};

SIMCLR_HD SmemLayout smem_layout(int64_t elem_bytes, int64_t acc_bytes, bool with_grad) {
  SmemLayout l{};
  const int64_t pad = smem_pad(elem_bytes);
  l.ld_in = score_chunk(elem_bytes) + pad;
  l.ld_s = kCudaTile + smem_pad(acc_bytes);
  l.ld_p = kCudaTile + pad;
  l.ld_yd = output_chunk(acc_bytes) + pad;
  l.x = 0;
  l.y = l.x + round_up(kCudaTile * l.ld_in * elem_bytes, kCudaSmemAlign);
  l.s = l.y + round_up(kCudaTile * l.ld_in * elem_bytes, kCudaSmemAlign);
  l.lab = l.s + round_up(kCudaTile * l.ld_s * acc_bytes, kCudaSmemAlign);
  l.total = l.lab + round_up(kCudaTile * 8, kCudaSmemAlign);
  l.p = l.yd = l.meta = -1;
  if (with_grad) {
    l.p = l.total;
    l.yd = l.p + round_up(kCudaTile * l.ld_p * elem_bytes, kCudaSmemAlign);
    l.meta = l.yd + round_up(kCudaTile * l.ld_yd * elem_bytes, kCudaSmemAlign);
    l.total = l.meta + round_up(3 * kCudaTile * acc_bytes, kCudaSmemAlign);
  }
  return l;
}

// Lane map of the per-row work on a warp's 16 x kCudaTile score strip: lane l serves row (l & 15) and
// the half (l >> 4) of the columns; its c-th column (c < 32) is rotated by the lane so that the 32 reads
// of a step fall on 32 distinct banks of the float score strip (row stride 68 words: bank 5r + c + 16 h;
// a rotation by the row alone put the two halves on the same 16 banks, a 2-way conflict).
SIMCLR_HDC int strip_row(int lane) { return lane & 15; }
SIMCLR_HDC int strip_col(int lane, int c) { return (lane >> 4) * 32 + ((c + lane) & 31); }

// Lane map of the SIMT (exact fp32 / fp64) products on a warp's 16-row strip: lane l owns rows
// (l >> 3) + 4 r (r < 4) and columns (l & 7) + 8 c, so that the 8 lanes of a row group read 8 distinct
// banks of the other operand.
SIMCLR_HDC int simt_row(int lane, int r) { return (lane >> 3) + 4 * r; }
SIMCLR_HDC int simt_col(int lane, int c) { return (lane & 7) + 8 * c; }

// Power of two in (m / 2, m] (1 when m is not positive and finite). The backward divides dL/dcos by it
// before the products and multiplies the sums back, so that float16 operands neither underflow
// (dL/dcos ~ 1 / (2N) for the mean over a large batch) nor overflow: |dL/dcos| <= m gives operands of
// magnitude < 2. A power of two keeps the scaling exact in every format. m is taken over the rows that
// have a positive (the others' gradients are 0 whatever their incoming gradient), times max(1, |w|) with
// DCLW's weights. What remains: an operand is g p / m with p a softmax probability, ~1 / L for the
// negatives of a row, and float16's smallest normal is 2^-14 = 1 / 16384: from L ~ 16k keys those terms
// are float16 subnormals (one bit of precision less per doubling of L; zero below 2^-24, L ~ 16M). They
// are the small terms of each sum, but for L >= 16k prefer bfloat16 (float32's exponent range).
template <typename acc_t>
SIMCLR_HD acc_t pow2_scale(acc_t m) {
  if (!(m > acc_t(0)) || !(m <= std::numeric_limits<acc_t>::max())) return acc_t(1);
  int e = 0;
  frexp(m, &e);  // m = f 2^e with f in [0.5, 1)
  return ldexp(acc_t(1), e - 1);
}

// Splits of the streamed tiles. A launch with few row tiles (2N = 16384 gives 256) leaves most SMs idle,
// so the other rows' tiles are cut into `splits` contiguous ranges, one per block (grid.y in forward,
// grid.z in backward); each writes partial results that a second kernel sums in split order, which keeps
// the result deterministic. Splits are only added until every SM has `blocks_per_sm` blocks.
// The blocks per SM are also the kernels' __launch_bounds__ (ptxas then caps the registers to fit them):
// forward 4 (<= 128 registers, ~52 KB of shared memory; float64: 165 registers, 68 KB: 3), backward 2
// (191-246 registers, ~80 KB of shared memory for 16-bit inputs; float64: 135 KB: 1).
constexpr int64_t kCudaMaxSplits = 8;
SIMCLR_HDC int64_t fwd_blocks_per_sm(int64_t elem_bytes) { return elem_bytes == 8 ? 3 : 4; }
SIMCLR_HDC int64_t bwd_blocks_per_sm(int64_t elem_bytes) { return elem_bytes == 8 ? 1 : 2; }

SIMCLR_HDC int64_t num_splits(int64_t base_blocks, int64_t tiles, int64_t sm_count, int64_t blocks_per_sm) {
  int64_t s = ceil_div(blocks_per_sm * sm_count, base_blocks);
  if (s > kCudaMaxSplits) s = kCudaMaxSplits;
  if (s > tiles) s = tiles;
  return s < 1 ? 1 : s;
}
// Split `split` of `splits` streams tiles [split_begin(split), split_begin(split + 1)).
SIMCLR_HDC int64_t split_begin(int64_t tiles, int64_t splits, int64_t split) { return split * tiles / splits; }

// Whether the tile of other rows [col0, col0 + kCudaTile) streamed by the block of own rows [row0, row0 +
// kCudaTile) needs per-entry tests: it runs past the other side's end, or it holds the own key of one of the
// block's rows (own row a a query: its key is a + self_offset; own row a a key: its query is a - self_offset).
// Every other tile (all but the last and the diagonal ones) skips the bounds and self tests.
SIMCLR_HDC bool tile_needs_mask(int64_t row0, int64_t col0, int64_t other_n, int64_t self_offset, bool own_is_query) {
  if (col0 + kCudaTile > other_n) return true;
  if (self_offset < 0) return false;
  const int64_t first = own_is_query ? row0 + self_offset : row0 - self_offset;  // own row0's partner
  return col0 < first + kCudaTile && first < col0 + kCudaTile;
}

// Launch plan of one forward / backward call: grids and dynamic shared memory.
struct CudaPlan {
  int64_t rows_q, rows_k;                    // padded rows of the normalized copies
  int64_t dim;                               // padded D
  int64_t score_chunks;                      // chunks of D per score tile
  int64_t out_chunks;                        // grid.y of the backward kernels
  int64_t grid_q, grid_k;                    // grid.x: row tiles of q (forward, dQ) and of k (dK)
  int64_t tiles_q, tiles_k;                  // real (not all-padding) tiles of q and k
  int64_t splits_fwd, splits_dq, splits_dk;  // grid.y of forward, grid.z of the dQ and dK passes
  int64_t norm_grid_q, norm_grid_k;          // normalize and normalization-backward kernels (a warp per row)
  int64_t smem_fwd, smem_bwd;
};

SIMCLR_HD CudaPlan make_cuda_plan(int64_t m, int64_t l, int64_t d, int64_t elem_bytes, int64_t acc_bytes,
                                  int64_t sm_count) {
  CudaPlan p{};
  p.rows_q = padded_rows(m);
  p.rows_k = padded_rows(l);
  p.dim = padded_dim(d);
  p.score_chunks = ceil_div(p.dim, score_chunk(elem_bytes));
  p.out_chunks = ceil_div(p.dim, output_chunk(acc_bytes));
  p.grid_q = p.rows_q / kCudaTile;
  p.grid_k = p.rows_k / kCudaTile;
  p.tiles_q = ceil_div(m, kCudaTile);
  p.tiles_k = ceil_div(l, kCudaTile);
  p.splits_fwd = num_splits(p.grid_q, p.tiles_k, sm_count, fwd_blocks_per_sm(elem_bytes));
  p.splits_dq = num_splits(p.grid_q * p.out_chunks, p.tiles_k, sm_count, bwd_blocks_per_sm(elem_bytes));
  p.splits_dk = num_splits(p.grid_k * p.out_chunks, p.tiles_q, sm_count, bwd_blocks_per_sm(elem_bytes));
  p.norm_grid_q = ceil_div(p.rows_q, kCudaNormRowsPerBlock);
  p.norm_grid_k = ceil_div(p.rows_k, kCudaNormRowsPerBlock);
  p.smem_fwd = smem_layout(elem_bytes, acc_bytes, false).total;
  p.smem_bwd = smem_layout(elem_bytes, acc_bytes, true).total;
  return p;
}

}  // namespace ntxent
}  // namespace simclr_ext
