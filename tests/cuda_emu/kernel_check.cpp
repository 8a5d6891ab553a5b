// The CUDA kernels of both ops, emulated (csrc/common/simt_host.h), in a program without torch's runtime, so
// that ThreadSanitizer instruments every access of the kernels and of the emulator (`make test-tsan`; a
// Python process cannot host TSan here). Runs the launch sequence of ntxent_cuda.cu on raw buffers for a
// few small NT-Xent cases (each precision path, an edge tile, several D chunks, split plans) and checks the
// loss and gradient against a float64 reference written here; runs the augmentation kernels on a small batch
// with jitter and blur and checks that every output is written and finite. Exit status 1 on a wrong result;
// TSan's reports make it fail too. tests/test_cuda_emu_checks.py compiles altered copies of the kernels with
// it to show that a removed barrier and an unmasked edge tile are caught.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "augment/augment_cuda_kernels.cuh"
#include "ntxent/ntxent_cuda_kernels.cuh"

namespace {

using simclr_ext::simt::launch;
namespace nt = simclr_ext::ntxent;
namespace aug = simclr_ext::augment;

constexpr int64_t kEmulatedSms = 2;  // few SMs: small problems get split plans

// NT-Xent over q = k = z (2n rows, positives i <-> i +- n, self excluded): per-row losses and the gradient
// of their sum with respect to z, in float64.
void reference(const std::vector<double>& z, int64_t rows, int64_t d, double t, std::vector<double>& loss,
               std::vector<double>& grad) {
  std::vector<double> zh(z.size()), norm(rows);
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += z[i * d + c] * z[i * d + c];
    norm[i] = std::max(std::sqrt(ss), 1e-12);
    for (int64_t c = 0; c < d; ++c) zh[i * d + c] = z[i * d + c] / norm[i];
  }
  const int64_t n = rows / 2;
  std::vector<double> dzh(z.size(), 0.0);
  loss.assign(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> s(rows);
    double mx = -INFINITY;
    for (int64_t j = 0; j < rows; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += zh[i * d + c] * zh[j * d + c];
      s[j] = dot / t;
      if (j != i) mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < rows; ++j) sum += j != i ? std::exp(s[j] - mx) : 0.0;
    const int64_t pos = (i + n) % rows;
    loss[i] = mx + std::log(sum) - s[pos];
    for (int64_t j = 0; j < rows; ++j) {
      if (j == i) continue;
      const double ds = (std::exp(s[j] - mx) / sum - (j == pos ? 1.0 : 0.0)) / t;
      for (int64_t c = 0; c < d; ++c) {
        dzh[i * d + c] += ds * zh[j * d + c];
        dzh[j * d + c] += ds * zh[i * d + c];
      }
    }
  }
  grad.assign(z.size(), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += zh[i * d + c] * dzh[i * d + c];
    for (int64_t c = 0; c < d; ++c) grad[i * d + c] = (dzh[i * d + c] - zh[i * d + c] * dot) / norm[i];
  }
}

template <typename T>
T to_storage(double v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}
template <typename T>
double from_storage(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return static_cast<double>(v);
  }
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::isnan(a[i]) ? INFINITY : std::fabs(a[i] - b[i]));
  return e;
}

// One symmetric NT-Xent forward + backward (q = k = z, self_offset 0) through the kernels, in the order of
// ntxent_cuda.cu: normalize, forward, merge, symmetric gradient pass, normalization backward.
template <typename T, bool kTC>
bool check_ntxent(const char* what, int64_t n, int64_t d, double tol, std::mt19937& rng) {
  using acc_t = nt::acc_of<T>;
  const int64_t rows = 2 * n;
  const double t = 0.2;
  std::normal_distribution<double> normal;
  std::vector<double> z64(rows * d);
  std::vector<T> z(rows * d);
  for (size_t i = 0; i < z.size(); ++i) {
    z[i] = to_storage<T>(normal(rng));
    z64[i] = from_storage(z[i]);
  }
  std::vector<int64_t> labels(rows);
  for (int64_t i = 0; i < rows; ++i) labels[i] = i % n;

  const nt::CudaPlan plan = nt::make_cuda_plan(rows, rows, d, sizeof(T), sizeof(acc_t), kEmulatedSms);
  std::vector<T> zhat(plan.rows_q * plan.dim);
  launch(nt::normalize_kernel<T>, dim3(plan.norm_grid_q), dim3(32 * nt::kCudaNormRowsPerBlock), 0, z.data(), rows, d,
         plan.rows_q, plan.dim, /*normalize=*/true, zhat.data());

  const nt::Temperature<acc_t> inv_t{static_cast<acc_t>(1.0 / t), nullptr};
  const nt::Bias<acc_t> no_bias{acc_t(0), nullptr};  // NT-Xent: the softmax mode, no sigmoid bias
  const int64_t splits = plan.splits_fwd;
  std::vector<acc_t> part(3 * splits * rows, NAN);
  std::vector<int> part_count(splits * rows, -1);
  const nt::RowPartials<acc_t> parts{part.data(), part.data() + splits * rows, part.data() + 2 * splits * rows,
                                     part_count.data()};
  simclr_ext::simt::func_set_max_dynamic_shared(nt::forward_kernel<T, kTC>, plan.smem_fwd);
  launch(nt::forward_kernel<T, kTC>, dim3(plan.grid_q, splits), dim3(nt::kCudaThreads), plan.smem_fwd, zhat.data(),
         zhat.data(), labels.data(), labels.data(), rows, rows, plan.dim, inv_t, int64_t{0}, false, /*sigmoid=*/false,
         no_bias, parts);
  std::vector<acc_t> loss(rows, NAN), lse(rows, NAN);
  std::vector<int> npos(rows, -1);
  launch(nt::merge_rows_kernel<acc_t>, dim3(static_cast<unsigned>((rows + 255) / 256)), dim3(256), 0, parts, rows,
         splits, static_cast<const acc_t*>(nullptr), /*sigmoid=*/false, loss.data(), lse.data(), npos.data());

  const std::vector<acc_t> g(rows, acc_t(1));
  const acc_t grad_bound = static_cast<acc_t>(1.0 / t);
  std::vector<acc_t> dhat(plan.splits_dq * plan.rows_q * plan.dim, NAN);
  auto grad = nt::grad_kernel<T, kTC, true, true>;
  simclr_ext::simt::func_set_max_dynamic_shared(grad, plan.smem_bwd);
  launch(grad, dim3(plan.grid_q, plan.out_chunks, plan.splits_dq), dim3(nt::kCudaThreads), plan.smem_bwd, zhat.data(),
         zhat.data(), labels.data(), labels.data(), rows, rows, plan.dim, lse.data(), g.data(), npos.data(), int64_t{0},
         int64_t{0}, &grad_bound, inv_t, int64_t{0}, false, static_cast<const acc_t*>(nullptr), /*sigmoid=*/false,
         no_bias, dhat.data());
  std::vector<T> dz(rows * d);
  std::vector<acc_t> radial(rows, NAN);
  launch(nt::normalize_backward_kernel<T>, dim3(plan.norm_grid_q), dim3(32 * nt::kCudaNormRowsPerBlock), 0, z.data(),
         dhat.data(), rows, d, plan.dim, plan.splits_dq, plan.rows_q * plan.dim, /*normalize=*/true, dz.data(),
         radial.data());

  std::vector<double> loss_ref, grad_ref;
  reference(z64, rows, d, t, loss_ref, grad_ref);
  std::vector<double> loss_ours(loss.begin(), loss.end()), grad_ours(rows * d);
  for (size_t i = 0; i < dz.size(); ++i) grad_ours[i] = from_storage(dz[i]);
  const double e_loss = max_abs_diff(loss_ours, loss_ref), e_grad = max_abs_diff(grad_ours, grad_ref);
  bool counts_ok = true;
  for (int v : npos) counts_ok = counts_ok && v == 1;
  const bool ok = e_loss <= tol && e_grad <= tol && counts_ok;
  std::printf("ntxent %-5s 2N=%-4lld D=%-4lld splits fwd %lld bwd %lld: loss err %.2e, grad err %.2e%s %s\n", what,
              static_cast<long long>(rows), static_cast<long long>(d), static_cast<long long>(splits),
              static_cast<long long>(plan.splits_dq), e_loss, e_grad, counts_ok ? "" : ", wrong positive counts",
              ok ? "ok" : "PARITY FAILURE");
  return ok;
}

// The augmentation kernels on a small batch: every sample with jitter (the contrast mean from the partials)
// and blur (the shared-memory path), one of them rotated and flipped. Every output must be finite.
bool check_augment(std::mt19937& rng) {
  constexpr int kBatch = 2, kC = 3, kH = 20, kW = 23, kOut = 17, kRadius = 2;
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> src(kBatch * kC * kH * kW);
  for (float& v : src) v = uniform(rng);
  std::vector<int64_t> offsets{0, kC * kH * kW}, shapes{kH, kW, kH, kW};
  std::vector<float> params(kBatch * aug::kNumParams, 0.f);
  for (int b = 0; b < kBatch; ++b) {
    float* p = params.data() + b * aug::kNumParams;
    p[aug::kTop] = 1.f;
    p[aug::kLeft] = 2.f;
    p[aug::kCropH] = kH - 3;
    p[aug::kCropW] = kW - 4;
    p[aug::kFlip] = static_cast<float>(b);
    p[aug::kAngle] = b == 0 ? 0.f : 17.f;
    p[aug::kJitter] = 1.f;
    p[aug::kBrightness] = 1.2f;
    p[aug::kContrast] = 0.8f;
    p[aug::kSaturation] = 1.1f;
    p[aug::kHue] = 0.05f;
    for (int k = 0; k < 4; ++k) p[aug::kOrder0 + k] = static_cast<float>((k + b) % 4);
    p[aug::kBlur] = 1.f;
    p[aug::kSigma] = 1.3f;
    p[aug::kSolarize] = static_cast<float>(b);
  }
  aug::Launch L{};
  L.channels = kC;
  L.out_h = kOut;
  L.out_w = kOut;
  L.radius = kRadius;
  L.src_cl = false;
  L.threshold = 0.5f;
  for (int c = 0; c < 3; ++c) {
    L.mean[c] = 0.45f;
    L.inv_std[c] = 4.f;
  }
  L.out_sb = kC * kOut * kOut;
  L.out_sc = kOut * kOut;
  L.out_sy = kOut;
  L.out_sx = 1;
  aug::Launch luma = L;
  luma.g = aug::make_tiling(kOut, kOut, aug::kMaxTile);
  L.g = aug::make_tiling(kOut, kOut, aug::kMinTile);  // several tiles per sample, with halos
  const size_t smem = aug::blur_smem_bytes(kC, aug::kMinTile, kRadius);
  std::vector<float> partials(kBatch * luma.g.tiles, NAN), means(kBatch, NAN), out(kBatch * L.out_sb, NAN);
  launch(aug::luma_partials_kernel<float, kC>, dim3(static_cast<unsigned>(kBatch * luma.g.tiles)), dim3(aug::kThreads),
         0, src.data(), offsets.data(), shapes.data(), params.data(), partials.data(), luma);
  launch(aug::luma_means_kernel, dim3(1), dim3(128), 0, partials.data(), params.data(), means.data(),
         static_cast<int64_t>(kBatch), luma);
  launch(aug::augment_main_kernel<float, float, kC>, dim3(static_cast<unsigned>(kBatch * L.g.tiles)),
         dim3(aug::kThreads), smem, src.data(), offsets.data(), shapes.data(), params.data(), means.data(), out.data(),
         L);
  int bad = 0;
  for (float v : out) bad += std::isfinite(v) ? 0 : 1;
  std::printf("augment batch %d %dx%d blur radius %d: %d of %zu outputs not written or not finite %s\n", kBatch, kOut,
              kOut, kRadius, bad, out.size(), bad == 0 ? "ok" : "FAILURE");
  return bad == 0;
}

}  // namespace

// Usage: kernel_check [first]. "first" runs only the first case (the altered-kernel checks need no more).
int main(int argc, char** argv) {
  const bool all = !(argc > 1 && std::string(argv[1]) == "first");
  std::mt19937 rng(20261204);
  bool ok = true;
  // 2N = 70: an edge tile (70 = 64 + 6) and the diagonal tiles; D = 40: one score chunk; D = 100: two.
  ok = check_ntxent<float, false>("fp32", 35, 40, 1e-4, rng) && ok;
  if (all) {
    ok = check_ntxent<float, false>("fp32", 35, 100, 1e-4, rng) && ok;
    ok = check_ntxent<float, true>("tf32", 35, 40, 2e-2, rng) && ok;
    ok = check_ntxent<double, false>("fp64", 35, 40, 1e-10, rng) && ok;
    ok = check_ntxent<__half, true>("fp16", 35, 40, 3e-2, rng) && ok;
    ok = check_augment(rng) && ok;
  }
  return ok ? 0 : 1;
}
