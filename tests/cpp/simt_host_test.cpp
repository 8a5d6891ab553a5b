// Checks of the CUDA emulation itself (csrc/common/simt_host.h) with small kernels of its own: barriers and
// shared memory, the divergent-barrier failures (a thread returned, another call site, a deadlock), shuffles,
// partial masks refused, shared memory poisoned per block, the dynamic shared-memory opt-in, wmma products
// against a float64 product, TF32 rounding and the 16-bit conversions (round to nearest even).
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "common/cuda_device.cuh"

namespace {

using simclr_ext::simt::launch;

// Each thread writes its index, the block meets, each reads its neighbour's: wrong without a real barrier.
__global__ void neighbour_kernel(int* out) {
  SIMCLR_DYNAMIC_SHARED(int, smem);
  smem[threadIdx.x] = static_cast<int>(threadIdx.x + 1000 * blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = smem[(threadIdx.x + 1) % blockDim.x];
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void two_sites_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 0 waits at the block barrier, lanes 1-31 at the warp barrier: neither can complete.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x >= 1 && threadIdx.x < 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_kernel(long long* xor_out, double* down_out) {
  const long long v = (1LL << 40) + threadIdx.x;
  xor_out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 5);
  down_out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 0.5 * threadIdx.x, 3);
}

__global__ void partial_mask_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1); }

// Reads shared memory before writing it: NaN in every block, the second block too after the first wrote.
__global__ void poison_kernel(float* dyn_out, float* static_out) {
  SIMCLR_DYNAMIC_SHARED(float, dyn);
  SIMCLR_STATIC_SHARED(float[64], stat);
  const float d = dyn[threadIdx.x], s = stat[threadIdx.x];
  __syncthreads();
  dyn[threadIdx.x] = 1.f;
  stat[threadIdx.x] = 2.f;
  dyn_out[blockIdx.x * blockDim.x + threadIdx.x] = d;
  static_out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

namespace wmma = nvcuda::wmma;

// C = A B for 16 x 16 tiles of one warp; A row-major, B column-major, as the contrastive kernels load them.
template <typename Operand, typename T, int K>
__global__ void mma_kernel(const T* a, const T* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, K, Operand, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, K, Operand, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, K);
  wmma::load_matrix_sync(fb, b, K);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

template <typename F>
std::string failure_of(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

void check_barriers() {
  std::vector<int> out(3 * 96, -1);
  launch(neighbour_kernel, dim3(3), dim3(96), 96 * sizeof(int), out.data());
  bool ok = true;
  for (int b = 0; b < 3; ++b) {
    for (int t = 0; t < 96; ++t) ok = ok && out[b * 96 + t] == (t + 1) % 96 + 1000 * b;
  }
  CHECK(ok, "neighbour values after __syncthreads");

  std::string e = failure_of([&] { launch(early_return_kernel, dim3(1), dim3(64), 0, out.data()); });
  CHECK(contains(e, "divergent barrier") && contains(e, "returned"), "early return: %s", e.c_str());
  e = failure_of([&] { launch(two_sites_kernel, dim3(1), dim3(64), 0, out.data()); });
  CHECK(contains(e, "divergent barrier") && contains(e, "while other threads wait at"), "two sites: %s", e.c_str());
  e = failure_of([&] { launch(deadlock_kernel, dim3(1), dim3(64), 0, out.data()); });
  CHECK(contains(e, "divergent barrier") && contains(e, "deadlock"), "deadlock: %s", e.c_str());
}

void check_shuffles() {
  std::vector<long long> x(64);
  std::vector<double> d(64);
  launch(shuffle_kernel, dim3(1), dim3(64), 0, x.data(), d.data());
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, base = t - lane;
    ok = ok && x[t] == (1LL << 40) + base + (lane ^ 5);
    ok = ok && d[t] == 0.5 * (lane + 3 < 32 ? t + 3 : t);
  }
  CHECK(ok, "xor / down shuffles");
  std::vector<float> f(32);
  const std::string e = failure_of([&] { launch(partial_mask_kernel, dim3(1), dim3(32), 0, f.data()); });
  CHECK(contains(e, "only full-warp masks"), "partial mask: %s", e.c_str());
}

void check_shared_memory() {
  std::vector<float> dyn(2 * 64, 0.f), stat(2 * 64, 0.f);
  launch(poison_kernel, dim3(2), dim3(64), 64 * sizeof(float), dyn.data(), stat.data());
  bool ok = true;
  for (int i = 0; i < 128; ++i) ok = ok && std::isnan(dyn[i]) && std::isnan(stat[i]);
  CHECK(ok, "shared memory reads NaN before it is written, in every block");
  std::vector<int> out(96);
  const size_t big = 64 * 1024;
  const std::string e = failure_of([&] { launch(neighbour_kernel, dim3(1), dim3(96), big, out.data()); });
  CHECK(contains(e, "cudaFuncSetAttribute"), "64 KiB without the opt-in: %s", e.c_str());
  simclr_ext::simt::func_set_max_dynamic_shared(neighbour_kernel, big);
  CHECK(failure_of([&] { launch(neighbour_kernel, dim3(1), dim3(96), big, out.data()); }).empty(), "opted in");
}

template <typename Operand, typename T, int K>
double mma_error(T (*to)(float), float (*from)(T)) {
  std::vector<T> a(16 * K), b(16 * K);
  std::vector<double> a64(16 * K), b64(16 * K);
  for (int i = 0; i < 16 * K; ++i) {
    a[i] = to(std::sin(0.37f * i));
    b[i] = to(std::cos(0.11f * i));
    a64[i] = from(a[i]);
    b64[i] = from(b[i]);
  }
  std::vector<float> c(256, NAN);
  launch(mma_kernel<Operand, T, K>, dim3(1), dim3(32), 0, a.data(), b.data(), c.data());
  double err = 0;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      double ref = 0;
      for (int k = 0; k < K; ++k) ref += a64[i * K + k] * b64[j * K + k];  // B column-major: b[j][k]
      err = std::max(err, std::isnan(c[i * 16 + j]) ? INFINITY : std::fabs(c[i * 16 + j] - ref));
    }
  }
  return err;
}

float tf32_of(float f) { return wmma::__float_to_tf32(f); }
float same(float f) { return f; }

void check_wmma_and_conversions() {
  const double fp16 = mma_error<__half, __half, 16>(&__float2half_rn, &__half2float);
  const double bf16 = mma_error<__nv_bfloat16, __nv_bfloat16, 16>(&__float2bfloat16_rn, &__bfloat162float);
  const double tf32 = mma_error<wmma::precision::tf32, float, 8>(&tf32_of, &same);
  CHECK(fp16 < 1e-5 && bf16 < 1e-5 && tf32 < 1e-5, "mma errors fp16 %.2e bf16 %.2e tf32 %.2e", fp16, bf16, tf32);
  // TF32: ties away from zero; the tensor cores read only the top 10 mantissa bits of an unrounded operand.
  const float tie = 1.f + std::ldexp(1.f, -11);
  CHECK(wmma::__float_to_tf32(tie) == 1.f + std::ldexp(1.f, -10), "tf32 tie rounds away from zero");
  CHECK(wmma::__float_to_tf32(-tie) == -(1.f + std::ldexp(1.f, -10)), "tf32 negative tie");
  CHECK(simclr_ext::simt::wmma::operand_value(1.f + std::ldexp(1.f, -12)) == 1.f, "tf32 operand truncated");
  const auto hb = [](float f) { return __float2half_rn(f).bits; };
  CHECK(hb(65504.f) == 0x7bff && hb(65519.f) == 0x7bff && hb(65520.f) == 0x7c00, "half overflow at 65520");
  CHECK(hb(1.f + std::ldexp(1.f, -11)) == 0x3c00 && hb(1.f + 3 * std::ldexp(1.f, -11)) == 0x3c02, "half ties");
  CHECK(hb(std::ldexp(1.f, -24)) == 0x0001 && hb(std::ldexp(1.f, -25)) == 0 && hb(3 * std::ldexp(1.f, -25)) == 2,
        "half subnormals round to even");
  CHECK((hb(NAN) & 0x7c00) == 0x7c00 && (hb(NAN) & 0x3ff) != 0 && hb(-0.f) == 0x8000, "half NaN, -0");
  bool ok = true;
  for (uint32_t h = 0; h < 0x7c00; ++h) ok = ok && hb(__half2float(simclr_ext::simt::half{uint16_t(h)})) == h;
  CHECK(ok, "every finite half round-trips");
  const auto bb = [](float f) { return __float2bfloat16_rn(f).bits; };
  CHECK(bb(1.f + std::ldexp(1.f, -8)) == 0x3f80 && bb(1.f + 3 * std::ldexp(1.f, -8)) == 0x3f82, "bf16 ties");
  CHECK(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))), "bf16 NaN");
}

}  // namespace

int main() {
  check_barriers();
  check_shuffles();
  check_shared_memory();
  check_wmma_and_conversions();
  return check_summary();
}
