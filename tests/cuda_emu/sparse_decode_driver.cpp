// Harness driver for kernels/cuda/sparse_decode.cu. Param op: gather_sum | gather_dot | sparse_t_matmul;
// dtype N k M D, and *_offset (elements) for misaligned operands.
// gather_sum: values (N, k), indices (N, k) int32, weight (M, D), bias (D) if has_bias -> out (N, D)
// gather_dot: grad (N, D), indices, weight -> out (N, k)
// sparse_t_matmul: coef (N, k), indices, rows (N, D) -> weight_grad (M, D), coef_sum (M) fp32
#include "driver.h"
#include "sparse_decode.cuh"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  const std::string op = c.str("op");
  driver::with_dtype(c, [&](auto tag) {
    using T = decltype(tag);
    const int64_t N = c.i("N"), k = c.i("k"), M = c.i("M"), D = c.i("D");
    const int32_t* indices = driver::device_array<int32_t>(c, "indices");
    if (op == "gather_sum") {
      const T* values = driver::device_array<T>(c, "values");
      const T* weight = driver::device_array<T>(c, "weight", c.i("weight_offset", 0));
      const T* bias = c.i("has_bias") ? driver::device_array<T>(c, "bias", c.i("bias_offset", 0)) : nullptr;
      T* out = driver::device_empty<T>(N * D, c.i("out_offset", 0));
      driver::check(pyinterp::cuda::gather_sum(values, indices, weight, bias, N, k, M, D, out, nullptr),
                    "gather_sum");
      c.write("out", out, sizeof(T) * N * D);
    } else if (op == "gather_dot") {
      const T* grad = driver::device_array<T>(c, "grad", c.i("grad_offset", 0));
      const T* weight = driver::device_array<T>(c, "weight", c.i("weight_offset", 0));
      T* out = driver::device_empty<T>(N * k);
      driver::check(pyinterp::cuda::gather_dot(grad, indices, weight, N, k, M, D, out, nullptr), "gather_dot");
      c.write("out", out, sizeof(T) * N * k);
    } else if (op == "sparse_t_matmul") {
      const T* coef = driver::device_array<T>(c, "coef");
      const T* rows = driver::device_array<T>(c, "rows", c.i("rows_offset", 0));
      T* weight_grad = driver::device_empty<T>(M * D, c.i("out_offset", 0));
      float* coef_sum = driver::device_empty<float>(M);
      size_t bytes = 0;
      driver::check(pyinterp::cuda::sparse_t_matmul_workspace_bytes<T>(N, k, M, D, &bytes),
                    "sparse_t_matmul_workspace_bytes");
      void* workspace = driver::device_bytes(bytes, 0);
      driver::check(pyinterp::cuda::sparse_t_matmul(coef, indices, rows, N, k, M, D, weight_grad, coef_sum,
                                                    workspace, bytes, nullptr),
                    "sparse_t_matmul");
      c.write("weight_grad", weight_grad, sizeof(T) * M * D);
      c.write("coef_sum", coef_sum, sizeof(float) * M);
    } else {
      std::exit(2);
    }
  });
  return 0;
}
