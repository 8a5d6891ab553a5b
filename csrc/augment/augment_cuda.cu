// Host side of the fused augmentation op on CUDA: input checks, the launch plan (blur shared memory only
// when a sample of the batch blurs, a smaller tile where it does not fit: csrc/augment/augment_cuda_plan.h),
// the dispatch over source type x output type x channel count, and the three launches. The kernels are
// csrc/augment/augment_cuda_kernels.cuh; the per-pixel math is csrc/augment/augment.h, the same helpers the
// CPU kernel runs. Written once as templates over a backend B (see ntxent_cuda.cu), registered at the end on
// the CUDA runtime; tests/cuda_emu/ includes this file and runs it on the host emulation of the same kernels.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "augment/augment.h"
#include "augment/augment_checks.h"
#include "augment/augment_cuda_kernels.cuh"
#include "augment/augment_cuda_plan.h"
#include "common/dispatch.h"
#if !defined(SIMCLR_EXT_CUDA_EMU)
#include "common/cuda_backend.cuh"
#endif

namespace simclr_ext {
namespace augment {
namespace {

// Plans the launches (failing before any kernel is queued if the plan is impossible), then runs the
// three kernels. `L` has every field but the tiling.
template <typename B, typename T, typename O, int C>
void launch(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes, const at::Tensor& params,
            Launch L, int64_t batch, bool blurs, int64_t blur_kernel, at::Tensor& out, typename B::Stream stream) {
  Launch luma = L;
  luma.g = make_tiling(L.out_h, L.out_w, kMaxTile);
  L.g = luma.g;
  size_t smem = 0;
  if (blurs) {
    // The main kernel's static shared memory (its BlockSample) comes out of the same opt-in limit.
    const int64_t limit = B::smem_optin(src) - B::template static_smem<augment_main_kernel<T, O, C>>(src);
    const BlurPlan plan = plan_blur(C, L.radius, limit);
    TORCH_CHECK(plan.fits, "augment: blur_kernel ", blur_kernel, " needs ", plan.bytes,
                " bytes of shared memory per block, the device allows ", limit);
    L.g = make_tiling(L.out_h, L.out_w, plan.tile);
    smem = plan.bytes;
  }
  const int64_t blocks = batch * L.g.tiles;  // >= batch * luma.g.tiles: the luma tiles are the largest
  TORCH_CHECK(blocks < (int64_t{1} << 31), "augment: too many tiles (", blocks, ") for one launch");
  const int64_t luma_blocks = batch * luma.g.tiles;
  const T* s = src.data_ptr<T>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* shp = shapes.data_ptr<int64_t>();
  const float* prm = params.data_ptr<float>();
  at::Tensor partials = B::empty({luma_blocks}, params.options());
  at::Tensor means = B::empty({batch}, params.options());
  B::launch(luma_partials_kernel<T, C>, dim3(static_cast<unsigned>(luma_blocks)), dim3(kThreads), 0, stream, s, off,
            shp, prm, partials.data_ptr<float>(), luma);
  B::launch(luma_means_kernel, dim3(static_cast<unsigned>((batch + 127) / 128)), dim3(128), 0, stream,
            partials.data_ptr<float>(), prm, means.data_ptr<float>(), batch, luma);
  auto kernel = augment_main_kernel<T, O, C>;
  if (smem > 0) B::set_max_dynamic_smem(kernel, static_cast<int64_t>(smem));
  B::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, s, off, shp, prm,
            means.data_ptr<float>(), out.data_ptr<O>(), L);
}

template <typename B>
at::Tensor augment_forward_cuda(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& shapes,
                                const at::Tensor& params, int64_t channels, bool src_channels_last, int64_t out_h,
                                int64_t out_w, int64_t blur_kernel, double solarize_threshold,
                                c10::ArrayRef<double> mean, c10::ArrayRef<double> std, at::ScalarType out_dtype,
                                bool out_channels_last) {
  const Config cfg = check_inputs(src, offsets, shapes, params, channels, out_h, out_w, blur_kernel, solarize_threshold,
                                  mean, std, out_dtype);
  const typename B::Guard guard(src.device());
  at::Tensor out = B::empty({cfg.batch, channels, out_h, out_w}, src.options().dtype(out_dtype),
                            out_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (cfg.batch == 0) return out;
  const typename B::Stream stream = B::stream(src);
  // params is a host tensor (checked): whether the blur path is needed is known before any launch.
  const bool blurs = any_sample_blurs(params.data_ptr<float>(), cfg.batch);

  Launch L;
  L.channels = cfg.channels;
  L.out_h = cfg.out_h;
  L.out_w = cfg.out_w;
  L.radius = cfg.radius;
  L.src_cl = src_channels_last;
  L.threshold = cfg.threshold;
  for (int c = 0; c < 3; ++c) {
    L.mean[c] = cfg.mean[c];
    L.inv_std[c] = cfg.inv_std[c];
  }
  const int64_t hw = static_cast<int64_t>(cfg.out_h) * cfg.out_w;
  L.out_sb = hw * cfg.channels;
  L.out_sc = out_channels_last ? 1 : hw;
  L.out_sy = out_channels_last ? static_cast<int64_t>(cfg.out_w) * cfg.channels : cfg.out_w;
  L.out_sx = out_channels_last ? cfg.channels : 1;

  const at::Tensor d_offsets = offsets.to(src.device());
  const at::Tensor d_shapes = shapes.to(src.device());
  const at::Tensor d_params = params.to(src.device());
  // 2 source types x 3 output types x 2 channel counts, each its own instantiation: the channel loops
  // unroll and stay in registers.
  auto run = [&](auto source, auto output, auto channels) {
    launch<B, decltype(source), decltype(output), decltype(channels)::value>(
        src, d_offsets, d_shapes, d_params, L, cfg.batch, blurs, blur_kernel, out, stream);
  };
  auto with_output = [&](auto source, auto channels) {
    dispatch_floating(out_dtype, "augment", [&](auto output) {
      if constexpr (!std::is_same_v<decltype(output), double>) run(source, output, channels);  // checked: no float64
    });
  };
  auto with_channels = [&](auto source) {
    if (cfg.channels == 3) {
      with_output(source, std::integral_constant<int, 3>{});
    } else {
      with_output(source, std::integral_constant<int, 1>{});
    }
  };
  if (src.scalar_type() == at::kByte) {
    with_channels(uint8_t{});
  } else {
    with_channels(float{});
  }
  return out;
}

}  // namespace

// The CUDA build registers the kernels for CUDA tensors; the emulated test build (tests/cuda_emu/) includes
// this file and registers the same orchestration on its own backend.
#if !defined(SIMCLR_EXT_CUDA_EMU)
TORCH_LIBRARY_IMPL(simclr_ext, CUDA, m) { m.impl("augment", &augment_forward_cuda<CudaBackend>); }
#endif

}  // namespace augment
}  // namespace simclr_ext
