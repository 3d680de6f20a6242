// Harness driver for kernels/cuda/ij_accumulate.cu. Params: dtype (f32 f16 bf16 f64) K rows tokens
// width has_jbar. Arrays: grads (K, rows, width) in dtype; weights (K), delta (tokens, width),
// P (rows) and Jbar (rows, width) in the accumulator type (f64 for f64, else f32), updated in place.
#include "driver.h"
#include "ij_accumulate.cuh"

namespace kernels = pyinterp::cuda;

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  const std::string dtype = c.str("dtype");
  const int64_t K = c.i("K"), rows = c.i("rows"), tokens = c.i("tokens"), width = c.i("width");
  const bool f64 = dtype == "f64";
  const kernels::GradDtype code = dtype == "f32"   ? kernels::GradDtype::kFloat32
                                  : dtype == "f16" ? kernels::GradDtype::kFloat16
                                  : dtype == "bf16" ? kernels::GradDtype::kBFloat16
                                                    : kernels::GradDtype::kFloat64;
  const size_t acc = f64 ? sizeof(double) : sizeof(float);
  const void* grads = driver::device_array<unsigned char>(c, "grads");
  const void* weights = driver::device_array<unsigned char>(c, "weights");
  const void* delta = driver::device_array<unsigned char>(c, "delta");
  void* P = driver::device_array<unsigned char>(c, "P");
  void* Jbar = c.i("has_jbar") ? driver::device_array<unsigned char>(c, "Jbar") : nullptr;
  driver::check(kernels::ij_accumulate(grads, code, weights, delta, P, Jbar, K, rows, tokens, width, nullptr),
                "ij_accumulate");
  c.write("P", P, acc * rows);
  if (Jbar) c.write("Jbar", Jbar, acc * rows * width);
  return 0;
}
