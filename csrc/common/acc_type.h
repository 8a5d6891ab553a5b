// The accumulation type of both op families: float64 inputs accumulate in float64, every other floating
// type (float32, float16, bfloat16, and CUDA's __half / __nv_bfloat16 storage types) in float32. One rule,
// as a ScalarType for the host code that allocates outputs and as a type for the kernels.
#pragma once

#include <c10/core/ScalarType.h>

#include <type_traits>

namespace simclr_ext {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
using acc_t_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace simclr_ext
