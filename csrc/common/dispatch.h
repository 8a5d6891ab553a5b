// The one dispatch idiom of both op families and both backends: dispatch_floating(dtype, what, f) calls
// f(T{}) with the C++ type of a floating dtype (c10::Half, c10::BFloat16, float, double), and the body
// takes the type as `using scalar_t = decltype(tag);`. A value tag rather than a macro (AT_DISPATCH_*)
// so that the body is an ordinary generic lambda: CUDA code maps the tag to its storage type
// (cuda_storage_t, csrc/common/cuda_types.cuh) and can nest a second dispatch inside. The dtypes are
// checked before (ntxent_checks.h, augment_checks.h); an unsupported one here names the op.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace simclr_ext {

template <typename F>
void dispatch_floating(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
  }
}

}  // namespace simclr_ext
