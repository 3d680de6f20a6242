// Harness driver for kernels/cuda/topk_encode.cu: runs topk_encode_forward on one case.
// Params: dtype N D M k k_aux has_b_enc has_b_dec x_offset w_offset (elements; misaligned rows).
// Arrays: x (N, D), W_enc (M, D), b_enc (M), b_dec (D), dead_mask (M, uint8) in the dtype's bits.
// Outputs: values, indices[, aux_values, aux_indices].
#include "driver.h"
#include "topk_encode.cuh"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  driver::with_dtype(c, [&](auto tag) {
    using T = decltype(tag);
    pyinterp::cuda::TopkEncodeArgs<T> a;
    a.N = c.i("N");
    a.D = c.i("D");
    a.M = c.i("M");
    a.k = c.i("k");
    a.k_aux = c.i("k_aux");
    a.x = driver::device_array<T>(c, "x", c.i("x_offset", 0));
    a.W_enc = driver::device_array<T>(c, "W_enc", c.i("w_offset", 0));
    if (c.i("has_b_enc")) a.b_enc = driver::device_array<T>(c, "b_enc");
    if (c.i("has_b_dec")) a.b_dec = driver::device_array<T>(c, "b_dec", c.i("b_dec_offset", 0));
    if (a.k_aux > 0) a.dead_mask = driver::device_array<bool>(c, "dead_mask");
    a.values = driver::device_empty<T>(a.N * a.k);
    a.indices = driver::device_empty<int32_t>(a.N * a.k);
    if (a.k_aux > 0) {
      a.aux_values = driver::device_empty<T>(a.N * a.k_aux);
      a.aux_indices = driver::device_empty<int32_t>(a.N * a.k_aux);
    }
    size_t bytes = 0;
    driver::check(pyinterp::cuda::topk_encode_forward_workspace_bytes(a, &bytes), "topk_encode_forward_workspace_bytes");
    void* workspace = driver::device_bytes(bytes, 0);
    driver::check(pyinterp::cuda::topk_encode_forward(a, workspace, bytes, nullptr), "topk_encode_forward");
    c.write("values", a.values, sizeof(T) * a.N * a.k);
    c.write("indices", a.indices, sizeof(int32_t) * a.N * a.k);
    if (a.k_aux > 0) {
      c.write("aux_values", a.aux_values, sizeof(T) * a.N * a.k_aux);
      c.write("aux_indices", a.aux_indices, sizeof(int32_t) * a.N * a.k_aux);
    }
  });
  return 0;
}
