// Device code of the contrastive op's CUDA kernels: element types, shared-memory tile copies, the score
// tile (tensor cores or SIMT), the backward accumulators and the __global__ kernels. Their host side (launch,
// dispatch, buffers) is ntxent_cuda.cu, the only file that includes this one (hence the anonymous
// namespace); the tiling they follow is ntxent_cuda_plan.h, checked on the host by the CPU tests.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/acc_type.h"
#include "common/cuda_device.cuh"
#include "ntxent/ntxent.h"
#include "ntxent/ntxent_cuda_plan.h"

namespace simclr_ext {
namespace ntxent {
namespace {

namespace wmma = nvcuda::wmma;

// ------------------------------------------------------------------------------------------------
// Element types
// ------------------------------------------------------------------------------------------------
// The accumulation type of a storage type (csrc/common/acc_type.h): float, double for double.
template <typename T>
using acc_of = acc_t_of<T>;

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

// wmma operand type and k-step of the tensor-core path of each storage type.
template <typename T>
struct Wmma;
template <>
struct Wmma<__half> {
  using operand = __half;
  static constexpr int kK = 16;
};
template <>
struct Wmma<__nv_bfloat16> {
  using operand = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct Wmma<float> {
  using operand = wmma::precision::tf32;
  static constexpr int kK = 8;
};

// TF32 fragments must hold values rounded to tf32; 16-bit fragments are used as loaded.
template <typename T, typename Frag>
__device__ __forceinline__ void round_operand(Frag& f) {
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
}

// ------------------------------------------------------------------------------------------------
// Shared memory
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Smem {
  using acc_t = acc_of<T>;
  SmemLayout lay;
  T* x;          // own rows, one score chunk
  T* y;          // other rows, one score chunk
  acc_t* s;      // cosines of the tile
  int64_t* lab;  // labels of the other rows
  T* p;          // dL/dcos of the tile (backward)
  T* yd;         // other rows, the block's output chunk of D (backward)
  acc_t* meta;   // lse, gradient, 1/npos of the other rows when they are queries (backward)

  __device__ Smem(unsigned char* base, bool with_grad) : lay(smem_layout(sizeof(T), sizeof(acc_t), with_grad)) {
    x = reinterpret_cast<T*>(base + lay.x);
    y = reinterpret_cast<T*>(base + lay.y);
    s = reinterpret_cast<acc_t*>(base + lay.s);
    lab = reinterpret_cast<int64_t*>(base + lay.lab);
    p = with_grad ? reinterpret_cast<T*>(base + lay.p) : nullptr;
    yd = with_grad ? reinterpret_cast<T*>(base + lay.yd) : nullptr;
    meta = with_grad ? reinterpret_cast<acc_t*>(base + lay.meta) : nullptr;
  }
};

// Copies rows [row0, row0 + kCudaTile) x columns [c0, c0 + width) of a padded row-major buffer into
// shared memory, 16 bytes per thread and step. width * sizeof(T) is a multiple of 16 (width is a
// multiple of kCudaDimAlign), and so are the row strides of both sides. Each thread issues up to
// kCudaCopyBatch loads before it stores them, so that their latencies overlap.
template <typename T>
__device__ __forceinline__ void copy_tile(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t row0,
                                          int64_t c0, int64_t width) {
  constexpr int kVec = 16 / sizeof(T);
  const int vecs = static_cast<int>(width / kVec);
  const int total = static_cast<int>(kCudaTile) * vecs;
  for (int first = threadIdx.x; first < total; first += kCudaCopyBatch * kCudaThreads) {
    uint4 buf[kCudaCopyBatch];
#pragma unroll
    for (int u = 0; u < kCudaCopyBatch; ++u) {
      const int v = first + u * kCudaThreads;
      if (v < total) {
        const int r = v / vecs;
        buf[u] = __ldg(reinterpret_cast<const uint4*>(src + (row0 + r) * ld_src + c0) + (v - r * vecs));
      }
    }
#pragma unroll
    for (int u = 0; u < kCudaCopyBatch; ++u) {
      const int v = first + u * kCudaThreads;
      if (v < total) {
        const int r = v / vecs;
        reinterpret_cast<uint4*>(dst + r * ld_dst)[v - r * vecs] = buf[u];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Score tile: sm.s[r][c] = <own_hat[row0 + r], other_hat[col0 + c]> for the warp's 16 rows r and all
// kCudaTile columns c. Called by the whole block (it synchronizes). `load_x` is false when the own
// rows are already resident (a single score chunk, loaded with the first tile). `extra_loads` runs
// once, after the first barrier, to fill the per-tile regions (labels, metadata, output chunk); the
// barrier before the products makes them visible.
// ------------------------------------------------------------------------------------------------
template <typename T, bool kTensorCores, typename ExtraLoads>
__device__ __forceinline__ void score_tile(const Smem<T>& sm, const T* own, const T* other, int64_t row0, int64_t col0,
                                           int64_t dim, bool load_x, ExtraLoads&& extra_loads) {
  using acc_t = acc_of<T>;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t chunk = score_chunk(sizeof(T));
  const int64_t num_chunks = ceil_div(dim, chunk);
  const int64_t ld = sm.lay.ld_in;
  const int64_t ld_s = sm.lay.ld_s;
  const int64_t strip = 16 * warp;

  if constexpr (kTensorCores) {
    constexpr int kK = Wmma<T>::kK;
    using Operand = typename Wmma<T>::operand;
    wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[4];
#pragma unroll
    for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.0f);
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t width = chunk_width(dim, chunk, c);
      __syncthreads();  // the previous products (and readers of the per-tile regions) are done
      if (load_x) copy_tile(sm.x, ld, own, dim, row0, c * chunk, width);
      copy_tile(sm.y, ld, other, dim, col0, c * chunk, width);
      if (c == 0) extra_loads();
      __syncthreads();
      for (int64_t kk = 0; kk < width; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, Operand, wmma::row_major> a;
        wmma::load_matrix_sync(a, sm.x + strip * ld + kk, static_cast<unsigned>(ld));
        round_operand<T>(a);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          // B(k, n') = other[16 n + n'][kk + k]: column-major with the shared row stride.
          wmma::fragment<wmma::matrix_b, 16, 16, kK, Operand, wmma::col_major> b;
          wmma::load_matrix_sync(b, sm.y + (16 * n) * ld + kk, static_cast<unsigned>(ld));
          round_operand<T>(b);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      wmma::store_matrix_sync(sm.s + strip * ld_s + 16 * n, acc[n], static_cast<unsigned>(ld_s), wmma::mem_row_major);
    }
  } else {
    acc_t acc[4][8];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[r][c] = acc_t(0);
    }
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t width = chunk_width(dim, chunk, c);
      __syncthreads();
      if (load_x) copy_tile(sm.x, ld, own, dim, row0, c * chunk, width);
      copy_tile(sm.y, ld, other, dim, col0, c * chunk, width);
      if (c == 0) extra_loads();
      __syncthreads();
      for (int64_t k = 0; k < width; ++k) {
        acc_t a[4];
        acc_t b[8];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = to_acc(sm.x[(strip + simt_row(lane, r)) * ld + k]);
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) b[cc] = to_acc(sm.y[simt_col(lane, cc) * ld + k]);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) acc[r][cc] = fma(a[r], b[cc], acc[r][cc]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) sm.s[(strip + simt_row(lane, r)) * ld_s + simt_col(lane, cc)] = acc[r][cc];
    }
  }
  __syncwarp();  // the warp reads back its own strip
}

// ------------------------------------------------------------------------------------------------
// Backward accumulators: dhat of a warp's 16 rows x output_chunk columns, fed tile by tile with
// P[warp's rows, tile] x other_hat[tile, the block's output chunk] (P and the chunk in shared memory).
// ------------------------------------------------------------------------------------------------
template <typename T, bool kTensorCores>
struct GradAccumulator;

template <typename T>
struct GradAccumulator<T, true> {
  static constexpr int kK = Wmma<T>::kK;
  static constexpr int kFrags = static_cast<int>(output_chunk(sizeof(float))) / 16;
  using Operand = typename Wmma<T>::operand;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> frag[kFrags];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(frag[f], 0.0f);
  }

  // yd: the other rows' output chunk in shared memory (ld_yd elements per row).
  __device__ __forceinline__ void add_tile(const Smem<T>& sm, const T* yd, int64_t ld_yd, int64_t strip, int /*lane*/,
                                           int64_t width) {
    const int64_t ld_p = sm.lay.ld_p;
    for (int kk = 0; kk < kCudaTile; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Operand, wmma::row_major> pa;
      wmma::load_matrix_sync(pa, sm.p + strip * ld_p + kk, static_cast<unsigned>(ld_p));
      round_operand<T>(pa);
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        if (16 * f < width) {
          // B(k, n) = other_hat[tile row kk + k][chunk column 16 f + n]: row-major.
          wmma::fragment<wmma::matrix_b, 16, 16, kK, Operand, wmma::row_major> yb;
          wmma::load_matrix_sync(yb, yd + kk * ld_yd + 16 * f, static_cast<unsigned>(ld_yd));
          round_operand<T>(yb);
          wmma::mma_sync(frag[f], pa, yb, frag[f]);
        }
      }
    }
  }

  // scale x rows [row, row + 16) x columns [d0, d0 + width) into the padded dhat (dim columns).
  __device__ __forceinline__ void store(float* dhat, int64_t row, int /*lane*/, int64_t dim, int64_t d0, int64_t width,
                                        float scale) {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      if (16 * f < width) {
#pragma unroll
        for (int t = 0; t < frag[f].num_elements; ++t) frag[f].x[t] *= scale;
        wmma::store_matrix_sync(dhat + row * dim + d0 + 16 * f, frag[f], static_cast<unsigned>(dim),
                                wmma::mem_row_major);
      }
    }
  }
};

template <typename T>
struct GradAccumulator<T, false> {
  using acc_t = acc_of<T>;
  static constexpr int kCols = static_cast<int>(output_chunk(sizeof(acc_t))) / 8;
  acc_t v[4][kCols];  // rows simt_row(lane, r), columns simt_col(lane, c)

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) v[r][c] = acc_t(0);
    }
  }

  __device__ __forceinline__ void add_tile(const Smem<T>& sm, const T* yd, int64_t ld_yd, int64_t strip, int lane,
                                           int64_t width) {
    const int64_t ld_p = sm.lay.ld_p;
    for (int k = 0; k < kCudaTile; ++k) {
      acc_t pv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) pv[r] = to_acc(sm.p[(strip + simt_row(lane, r)) * ld_p + k]);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (8 * c < width) {
          const acc_t yv = to_acc(yd[k * ld_yd + simt_col(lane, c)]);
#pragma unroll
          for (int r = 0; r < 4; ++r) v[r][c] = fma(pv[r], yv, v[r][c]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(acc_t* dhat, int64_t row, int lane, int64_t dim, int64_t d0, int64_t width,
                                        acc_t scale) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (8 * c < width) dhat[(row + simt_row(lane, r)) * dim + d0 + simt_col(lane, c)] = v[r][c] * scale;
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

// Sum over the 32 lanes of a warp; every lane gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// |x[row]|^2 of a row of length d, one warp per row (every lane gets it).
template <typename T>
__device__ __forceinline__ acc_of<T> row_sum_squares(const T* __restrict__ x, int64_t row, int64_t d, int lane) {
  acc_of<T> ss = acc_of<T>(0);
  for (int64_t c = lane; c < d; c += 32) {
    const acc_of<T> v = to_acc(x[row * d + c]);
    ss = fma(v, v, ss);
  }
  return warp_sum(ss);
}

// xhat[row] = x[row] / max(|x[row]|, eps) into a zero-padded rows_padded x dim buffer; one warp per row.
template <typename T>
__global__ void __launch_bounds__(32 * kCudaNormRowsPerBlock)
    normalize_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t rows_padded, int64_t dim, bool normalize,
                     T* __restrict__ xhat) {
  using acc_t = acc_of<T>;
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * kCudaNormRowsPerBlock + threadIdx.x / 32;
  if (row >= rows_padded) return;
  const bool real = row < n;
  acc_t norm = acc_t(1);
  if (real && normalize) {  // normalize = false: a padded copy of the rows as given (dot products)
    norm = clamped_norm(row_sum_squares(x, row, d, lane));
  }
  for (int64_t c = lane; c < dim; c += 32) {
    const acc_t v = (real && c < d) ? to_acc(x[row * d + c]) / norm : acc_t(0);
    xhat[row * dim + c] = from_acc<T>(v);
  }
}

// 1 / temperature for the kernels: the value, read on the host when the temperature tensor is on the CPU,
// else a pointer to it in device memory.
template <typename acc_t>
struct Temperature {
  acc_t inv_value;
  const acc_t* inv_on_device;  // nullptr: use inv_value
  __device__ __forceinline__ acc_t inverse() const { return inv_on_device != nullptr ? *inv_on_device : inv_value; }
};

// The sigmoid mode's bias b for the kernels: a value read on the host, or a pointer to it in device memory.
template <typename acc_t>
struct Bias {
  acc_t value;
  const acc_t* on_device;  // nullptr: use value
  __device__ __forceinline__ acc_t get() const { return on_device != nullptr ? *on_device : value; }
};

// Partial forward results of one split of the key tiles, [splits x M] each: the running log-sum-exp
// (max, sum of exp(s - max)), the sum and the count of the positive logits. Sigmoid mode: max holds the sum of
// sigmoid(z), sum the sum of softplus(z), pos_sum the positives' z (ntxent.h).
template <typename acc_t>
struct RowPartials {
  acc_t* max;
  acc_t* sum;
  acc_t* pos_sum;
  int* pos_count;
};

// Forward: one block per kCudaTile query rows and split of the key tiles (blockIdx.y).
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kCudaThreads, fwd_blocks_per_sm(sizeof(T)))
    forward_kernel(const T* __restrict__ qhat, const T* __restrict__ khat, const int64_t* __restrict__ q_labels,
                   const int64_t* __restrict__ k_labels, int64_t m, int64_t l, int64_t dim,
                   Temperature<acc_of<T>> temperature, int64_t self_offset, bool exclude_positives, bool sigmoid,
                   Bias<acc_of<T>> bias_in, RowPartials<acc_of<T>> out) {
  using acc_t = acc_of<T>;
  const acc_t inv_t = temperature.inverse();
  const acc_t bias = sigmoid ? bias_in.get() : acc_t(0);
  acc_t softplus_sum = acc_t(0), sigmoid_sum = acc_t(0);
  SIMCLR_DYNAMIC_SHARED(unsigned char, smem_raw);
  const Smem<T> sm(smem_raw, false);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCudaTile;
  const int r = strip_row(lane);
  const int64_t i = row0 + 16 * warp + r;
  const bool row_ok = i < m;
  const int64_t label = row_ok ? q_labels[i] : 0;
  const acc_t* srow = sm.s + (16 * warp + r) * sm.lay.ld_s;
  const bool single_chunk = ceil_div(dim, score_chunk(sizeof(T))) == 1;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  OnlineLSE<acc_t> run = OnlineLSE<acc_t>::empty();
  acc_t pos_sum = acc_t(0);
  long long pos_count = 0;
  const int64_t tiles = ceil_div(l, kCudaTile);
  const int64_t t_begin = split_begin(tiles, gridDim.y, blockIdx.y);
  const int64_t t_end = split_begin(tiles, gridDim.y, blockIdx.y + 1);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kCudaTile;
    score_tile<T, kTensorCores>(sm, qhat, khat, row0, col0, dim, t == t_begin || !single_chunk, [&] {
      for (int c = threadIdx.x; c < kCudaTile; c += kCudaThreads) sm.lab[c] = col0 + c < l ? k_labels[col0 + c] : 0;
    });
    acc_t v[32];
    acc_t vmax = neg_inf;
    const bool masked = tile_needs_mask(row0, col0, l, self_offset, true);  // the last and diagonal tiles
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = strip_col(lane, c);
      const int64_t j = col0 + col;
      const bool ok = row_ok && (!masked || (j < l && j != self_key(i, self_offset)));
      const acc_t s = logit(srow[col], inv_t) + bias;  // the bias is 0 but in the sigmoid mode
      const bool positive = ok && sm.lab[col] == label;
      if (sigmoid && ok) {
        softplus_sum += softplus(s);
        sigmoid_sum += ntxent::sigmoid(s);
      }
      if (positive) {
        pos_sum += s;
        ++pos_count;
      }
      const bool in_denominator = ok && !(positive && exclude_positives);  // DCL: positives leave it
      v[c] = in_denominator ? s : neg_inf;
      if (in_denominator) vmax = fmax(vmax, s);  // NaN scores are skipped here and poison the sum below
    }
    const acc_t mu = vmax == neg_inf ? acc_t(0) : vmax;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int c = 0; c < 32; ++c) sum += exp(v[c] - mu);
    OnlineLSE<acc_t> tile{mu, sum};
    tile.merge(__shfl_xor_sync(0xffffffffu, mu, 16), __shfl_xor_sync(0xffffffffu, sum, 16));
    run.merge(tile.max, tile.sum);
  }
  pos_sum += __shfl_xor_sync(0xffffffffu, pos_sum, 16);
  pos_count += __shfl_xor_sync(0xffffffffu, pos_count, 16);
  softplus_sum += __shfl_xor_sync(0xffffffffu, softplus_sum, 16);
  sigmoid_sum += __shfl_xor_sync(0xffffffffu, sigmoid_sum, 16);
  if (lane < 16 && row_ok) {
    const int64_t at = static_cast<int64_t>(blockIdx.y) * m + i;
    out.max[at] = sigmoid ? sigmoid_sum : run.max;
    out.sum[at] = sigmoid ? softplus_sum : run.sum;
    out.pos_sum[at] = pos_sum;
    out.pos_count[at] = static_cast<int>(pos_count);
  }
}

// Merges the splits of each row in split order (deterministic): loss, lse and npos. One thread per row.
template <typename acc_t>
__global__ void merge_rows_kernel(RowPartials<acc_t> part, int64_t m, int64_t splits, const acc_t* __restrict__ weight,
                                  bool sigmoid, acc_t* __restrict__ loss, acc_t* __restrict__ lse,
                                  int* __restrict__ npos) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m) return;
  if (sigmoid) {  // loss_i = sum softplus(z) - sum over positives of z; lse slot: sum sigmoid(z) (ntxent.h)
    acc_t sp = acc_t(0), sg = acc_t(0), pz = acc_t(0);
    int64_t count = 0;
    for (int64_t s = 0; s < splits; ++s) {
      sg += part.max[s * m + i];
      sp += part.sum[s * m + i];
      pz += part.pos_sum[s * m + i];
      count += part.pos_count[s * m + i];
    }
    loss[i] = sp - pz;
    lse[i] = sg;
    npos[i] = static_cast<int>(count);
    return;
  }
  OnlineLSE<acc_t> run = OnlineLSE<acc_t>::empty();
  acc_t pos_sum = acc_t(0);
  int64_t pos_count = 0;
  for (int64_t s = 0; s < splits; ++s) {
    run.merge(part.max[s * m + i], part.sum[s * m + i]);
    pos_sum += part.pos_sum[s * m + i];
    pos_count += part.pos_count[s * m + i];
  }
  const acc_t value = run.value();
  lse[i] = value;
  loss[i] = row_loss(value, pos_sum, pos_count, weight != nullptr ? weight[i] : acc_t(1));
  npos[i] = static_cast<int>(pos_count);
}

// Backward: dhat[split blockIdx.z][own rows, output chunk blockIdx.y] = sum over the split's other rows
// of dL/dcos x other_hat. kOwnIsQuery: own rows are queries (dQ pass), else keys (dK pass, other rows
// are queries). kBothFactors: dL/dcos has a term from each side's factors (symmetric_cosine_grad,
// ntxent.h), read at own_base + own row and other_base + other row of lse / grad / npos:
//   q is k (one labels tensor, self_offset 0; bases 0, 0): H = dS + dS^T, so this one pass (own rows are
//       queries) gives the whole gradient: each tile is recomputed once and multiplied once;
//   two_way (CLIP; query rows' factors at 0, key columns' at M): the dQ and the dK pass.
// dhat holds gridDim.z slices of own rows_padded x dim; normalize_backward sums them.
template <typename T, bool kTensorCores, bool kOwnIsQuery, bool kBothFactors>
__global__ void __launch_bounds__(kCudaThreads, bwd_blocks_per_sm(sizeof(T)))
    grad_kernel(const T* __restrict__ own_hat, const T* __restrict__ other_hat, const int64_t* __restrict__ own_labels,
                const int64_t* __restrict__ other_labels, int64_t own_n, int64_t other_n, int64_t dim,
                const acc_of<T>* __restrict__ lse, const acc_of<T>* __restrict__ grad, const int* __restrict__ npos,
                int64_t own_base, int64_t other_base, const acc_of<T>* __restrict__ grad_bound,
                Temperature<acc_of<T>> temperature, int64_t self_offset, bool exclude_positives,
                const acc_of<T>* __restrict__ weight, bool sigmoid, Bias<acc_of<T>> bias_in,
                acc_of<T>* __restrict__ dhat) {
  using acc_t = acc_of<T>;
  const acc_t inv_t = temperature.inverse();
  // Sigmoid mode (never with both factors): every row has a gradient, weight 1 on each positive (ntxent.h).
  const acc_t bias = sigmoid ? bias_in.get() : acc_t(0);
  constexpr int64_t kOut = output_chunk(sizeof(acc_t));
  SIMCLR_DYNAMIC_SHARED(unsigned char, smem_raw);
  const Smem<T> sm(smem_raw, true);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCudaTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kOut;
  const int64_t width = chunk_width(dim, kOut, blockIdx.y);
  const int64_t strip = 16 * warp;
  const int r = strip_row(lane);
  const int64_t a = row0 + strip + r;  // this lane's own row
  const bool own_ok = a < own_n;
  const int64_t label = own_ok ? own_labels[a] : 0;
  // Per-query factors of the row when own rows are queries: g (0 for rows without positives), lse, 1/npos.
  acc_t own_g = acc_t(0), own_lse = acc_t(0), own_inv_np = acc_t(0);
  if (kOwnIsQuery && own_ok && (npos[a] > 0 || sigmoid)) {
    own_g = grad[a];
    own_lse = lse[a];
    own_inv_np = (weight != nullptr ? weight[a] : acc_t(1)) / acc_t(npos[a]);  // w / |P|
  }
  const acc_t* srow = sm.s + (strip + r) * sm.lay.ld_s;
  T* prow = sm.p + (strip + r) * sm.lay.ld_p;
  const bool single_chunk = ceil_div(dim, score_chunk(sizeof(T))) == 1;
  // With a single score chunk the other rows' score tile holds all of D, hence the output chunk too
  // (then d0 = 0): the products read it instead of a second copy.
  const T* yd = single_chunk ? sm.y : sm.yd;
  const int64_t ld_yd = single_chunk ? sm.lay.ld_in : sm.lay.ld_yd;
  acc_t* meta_lse = sm.meta;
  acc_t* meta_g = sm.meta + kCudaTile;
  acc_t* meta_inv_np = sm.meta + 2 * kCudaTile;

  // Factors of the own row for the both-factor passes (ntxent.h's RowFactors: g includes 1/t; a row without
  // positives has g = 0 and lse = +inf, so its terms vanish without a branch). DCLW's weights exist only
  // without two_way, where both bases are 0.
  const int64_t fa = own_base + a;
  const acc_t own_w = own_ok && weight != nullptr ? weight[fa] : acc_t(1);
  const RowFactors<acc_t> own_f = kBothFactors && own_ok ? row_factors(grad[fa], lse[fa], npos[fa], inv_t, own_w)
                                                         : RowFactors<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
  // |dL/dcos| <= max |g| / t (grad_bound), twice that with both sides' terms: the products run on
  // dL/dcos / scale, of magnitude < 2.
  const acc_t scale = pow2_scale(*grad_bound * acc_t(kBothFactors ? 2 : 1));
  const acc_t inv_scale = acc_t(1) / scale;
  GradAccumulator<T, kTensorCores> acc;
  acc.zero();

  const int64_t tiles = ceil_div(other_n, kCudaTile);
  const int64_t t_begin = split_begin(tiles, gridDim.z, blockIdx.z);
  const int64_t t_end = split_begin(tiles, gridDim.z, blockIdx.z + 1);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kCudaTile;
    score_tile<T, kTensorCores>(sm, own_hat, other_hat, row0, col0, dim, t == t_begin || !single_chunk, [&] {
      for (int c = threadIdx.x; c < kCudaTile; c += kCudaThreads) {
        const int64_t b = col0 + c;
        sm.lab[c] = b < other_n ? other_labels[b] : 0;
        if (kBothFactors) {
          const int64_t fb = other_base + b;
          const acc_t w = b < other_n && weight != nullptr ? weight[fb] : acc_t(1);
          const RowFactors<acc_t> f = b < other_n ? row_factors(grad[fb], lse[fb], npos[fb], inv_t, w)
                                                  : RowFactors<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
          meta_g[c] = f.g;
          meta_lse[c] = f.lse;
          meta_inv_np[c] = f.inv_np;
        } else if (!kOwnIsQuery) {
          const int np = b < other_n ? npos[b] : 0;
          meta_g[c] = np > 0 || (sigmoid && b < other_n) ? grad[b] : acc_t(0);
          meta_lse[c] = np > 0 ? lse[b] : acc_t(0);
          meta_inv_np[c] = np > 0 ? (weight != nullptr ? weight[b] : acc_t(1)) / acc_t(np) : acc_t(0);
        }
      }
      if (!single_chunk) copy_tile(sm.yd, ld_yd, other_hat, dim, col0, d0, width);
    });
    // dL/dcos of the warp's strip, in the operand type of the products. Bounds and self tests only on the
    // last and diagonal tiles.
    const bool masked = tile_needs_mask(row0, col0, other_n, self_offset, kOwnIsQuery);
#pragma unroll 4
    for (int c = 0; c < 32; ++c) {
      const int col = strip_col(lane, c);
      const int64_t b = col0 + col;
      const int64_t qi = kOwnIsQuery ? a : b;
      const int64_t kj = kOwnIsQuery ? b : a;
      const acc_t g = kOwnIsQuery ? own_g : meta_g[col];
      acc_t dcos = acc_t(0);
      if (kBothFactors) {
        if (own_ok && (!masked || (b < other_n && kj != self_key(qi, self_offset)))) {
          const RowFactors<acc_t> other_f{meta_g[col], meta_lse[col], meta_inv_np[col]};
          dcos = symmetric_cosine_grad(srow[col], inv_t, own_f, other_f, sm.lab[col] == label, exclude_positives);
        }
      } else if (sigmoid && own_ok && g != acc_t(0) && (!masked || b < other_n)) {
        dcos = sigmoid_cosine_grad(srow[col], inv_t, bias, g, sm.lab[col] == label);
      } else if (own_ok && g != acc_t(0) && (!masked || (b < other_n && kj != self_key(qi, self_offset)))) {
        dcos = cosine_grad(srow[col], inv_t, kOwnIsQuery ? own_lse : meta_lse[col], g, sm.lab[col] == label,
                           kOwnIsQuery ? own_inv_np : meta_inv_np[col], exclude_positives);
      }
      prow[col] = from_acc<T>(dcos * inv_scale);
    }
    __syncwarp();
    acc.add_tile(sm, yd, ld_yd, strip, lane, width);
  }
  const int64_t slice = static_cast<int64_t>(gridDim.x) * kCudaTile * dim;  // rows_padded x dim
  acc.store(dhat + blockIdx.z * slice, row0 + strip, lane, dim, d0, width, scale);
}

// dxhat[row][c] as the sum of the backward's split slices, in split order.
template <typename acc_t>
__device__ __forceinline__ acc_t split_sum(const acc_t* __restrict__ dxhat, int64_t at, int64_t splits, int64_t slice) {
  acc_t g = dxhat[at];
  for (int64_t s = 1; s < splits; ++s) g += dxhat[s * slice + at];
  return g;
}

// Normalization backward, one warp per row: dx = (dxhat - xhat <xhat, dxhat>) / |x|, or dxhat / eps
// where the norm was clamped (F.normalize's gradient). dxhat: `splits` slices of `slice` elements.
// radial (nullable): <xhat, dxhat> per row, the terms of the temperature's gradient.
// xhat is recomputed as x / |x| (not x * (1 / |x|)) so that for D = 1 the projection cancels exactly.
template <typename T>
__global__ void __launch_bounds__(32 * kCudaNormRowsPerBlock)
    normalize_backward_kernel(const T* __restrict__ x, const acc_of<T>* __restrict__ dxhat, int64_t n, int64_t d,
                              int64_t dim, int64_t splits, int64_t slice, bool normalize, T* __restrict__ dx,
                              acc_of<T>* __restrict__ radial) {
  using acc_t = acc_of<T>;
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * kCudaNormRowsPerBlock + threadIdx.x / 32;
  if (row >= n) return;
  // Unnormalized rows (dot products): norm 1 and no projection, dx = dxhat; the radial dot is <x, dx>.
  const acc_t ss = normalize ? row_sum_squares(x, row, d, lane) : acc_t(1);
  const acc_t norm = normalize ? clamped_norm(ss) : acc_t(1);
  const bool clamped = !normalize || norm_clamped(ss);
  acc_t dot = acc_t(0);  // <xhat, dxhat>
  for (int64_t c = lane; c < d; c += 32) {
    dot = fma(to_acc(x[row * d + c]) / norm, split_sum(dxhat, row * dim + c, splits, slice), dot);
  }
  dot = warp_sum(dot);
  if (radial != nullptr && lane == 0) radial[row] = dot;  // every row, clamped ones too (ntxent.h)
  for (int64_t c = lane; c < d; c += 32) {
    const acc_t g = split_sum(dxhat, row * dim + c, splits, slice);
    const acc_t v = clamped ? g / norm : (g - to_acc(x[row * d + c]) / norm * dot) / norm;
    dx[row * d + c] = from_acc<T>(v);
  }
}

}  // namespace
}  // namespace ntxent
}  // namespace simclr_ext
