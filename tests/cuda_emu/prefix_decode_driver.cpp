// Harness driver for kernels/cuda/prefix_decode.cu. Param op: forward | gather_dot | t_matmul;
// dtype N k D, prefixes (comma-separated, the last is M), and *_offset (elements) for misaligned operands.
// forward: values (N, k), indices (N, k) int32, weight (M, D), bias (D) if has_bias -> out (P, N, D)
// gather_dot: grad_suffix (P, N, D), indices, weight -> out (N, k)
// t_matmul: coef (N, k), indices, grad_suffix (P, N, D) -> weight_grad (M, D)
#include "driver.h"
#include "prefix_decode.cuh"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  const std::string op = c.str("op");
  const std::vector<int64_t> prefixes = c.list("prefixes");
  const int64_t P = static_cast<int64_t>(prefixes.size()), M = prefixes.back();
  driver::with_dtype(c, [&](auto tag) {
    using T = decltype(tag);
    const int64_t N = c.i("N"), k = c.i("k"), D = c.i("D");
    const int32_t* indices = driver::device_array<int32_t>(c, "indices");
    if (op == "forward") {
      const T* values = driver::device_array<T>(c, "values");
      const T* weight = driver::device_array<T>(c, "weight", c.i("weight_offset", 0));
      const T* bias = c.i("has_bias") ? driver::device_array<T>(c, "bias", c.i("bias_offset", 0)) : nullptr;
      T* out = driver::device_empty<T>(P * N * D, c.i("out_offset", 0));
      driver::check(pyinterp::cuda::prefix_decode_forward(values, indices, weight, bias, prefixes.data(), P, N, k,
                                                          D, out, nullptr),
                    "prefix_decode_forward");
      c.write("out", out, sizeof(T) * P * N * D);
    } else if (op == "gather_dot") {
      const T* grad = driver::device_array<T>(c, "grad_suffix", c.i("grad_offset", 0));
      const T* weight = driver::device_array<T>(c, "weight", c.i("weight_offset", 0));
      T* out = driver::device_empty<T>(N * k);
      driver::check(pyinterp::cuda::prefix_gather_dot(grad, indices, weight, prefixes.data(), P, N, k, D, out,
                                                      nullptr),
                    "prefix_gather_dot");
      c.write("out", out, sizeof(T) * N * k);
    } else if (op == "t_matmul") {
      const T* coef = driver::device_array<T>(c, "coef");
      const T* grad = driver::device_array<T>(c, "grad_suffix", c.i("grad_offset", 0));
      T* weight_grad = driver::device_empty<T>(M * D, c.i("out_offset", 0));
      size_t bytes = 0;
      driver::check(pyinterp::cuda::prefix_t_matmul_workspace_bytes<T>(N, k, M, D, &bytes),
                    "prefix_t_matmul_workspace_bytes");
      void* workspace = driver::device_bytes(bytes, 0);
      driver::check(pyinterp::cuda::prefix_t_matmul(coef, indices, grad, prefixes.data(), P, N, k, D, weight_grad,
                                                    workspace, bytes, nullptr),
                    "prefix_t_matmul");
      c.write("weight_grad", weight_grad, sizeof(T) * M * D);
    } else {
      std::exit(2);
    }
  });
  return 0;
}
