// Argument checks shared by the CPU kernels (csrc/cpu/*.cpp): each error names the op and the
// argument, and says what was expected and what came. Also the accumulation dtype rule they share.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace pyinterp::cpu {

// The floating dtypes the CPU kernels take (float64 too, for gradcheck).
inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

// Sums accumulate in fp32; float64 inputs stay float64 (as a dtype, and as the C++ type for scalar_t).
inline at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// A 2-D CPU tensor.
inline void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

// A 1-D CPU tensor of `size` elements; `size_is` says what the size is (e.g. "D = weight.size(1)").
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t size,
                         const char* size_is) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, ",) with ",
              size_is, ", got ", t.sizes());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16, bfloat16 ",
              "or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", like_name, " has ", like.scalar_type(), "; they must match");
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

}  // namespace pyinterp::cpu
