// Every pyinterp:: op schema, in one place, plus the pybind11 helpers that `pyinterp info` reports.
// Implementations register against these schemas elsewhere:
//   CPU   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(pyinterp, CPU, m)
//   CUDA  csrc/cuda/<op>.cpp  STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m)   (module _C_cuda)
//   Triton ops and the public autograd-carrying ops are registered from Python (pyinterp/ops/).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(pyinterp, m) {
  // ---- SAE: top-k encode (pyinterp/ops/topk_encode.py) ----
  // x (N, D); W_enc (M, D); b_enc (M) or None; b_dec (D) or None; dead_mask (M) bool or None.
  // Returns post-ReLU values (N, k) in x's dtype, descending, ties to the lower latent index;
  // indices (N, k) int32; aux_values / aux_indices (N, k_aux) over dead latents only ((N, 0) if k_aux=0).
  m.def("topk_encode_forward(Tensor x, Tensor W_enc, Tensor? b_enc, Tensor? b_dec, int k, "
        "Tensor? dead_mask, int k_aux) -> (Tensor values, Tensor indices, Tensor aux_values, "
        "Tensor aux_indices)");
  // ---- SAE: JumpReLU threshold encode (pyinterp/ops/threshold_encode.py) ----
  // x (N, D); W_enc (M, D); b_enc (M) or None; b_dec (D) or None; lower (M): the listing threshold
  // (theta - bandwidth / 2). Per row, the latents with s = z - lower > 0, z = (x - b_dec) @ W_enc^T + b_enc,
  // in ascending latent index; a row with more than max_active keeps its max_active largest s (ties to
  // the lower index). Returns preacts (N, max_active) z in the accumulator dtype (fp32; fp64 for fp64 x)
  // and indices (N, max_active) int32, unused slots 0; listed (N) int32 slots used; truncated (N) bool.
  m.def("threshold_encode_forward(Tensor x, Tensor W_enc, Tensor? b_enc, Tensor? b_dec, Tensor lower, "
        "int max_active) -> (Tensor preacts, Tensor indices, Tensor listed, Tensor truncated)");
  // ---- SAE: sparse decode and the sparse products both SAE ops' backwards use
  //      (pyinterp/ops/sparse_decode.py) ----
  // out[n] = sum_j values[n,j] * weight[indices[n,j]] (+ bias); (N, D) in values' dtype.
  m.def("gather_sum(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor");
  // out[n,j] = <grad[n], weight[indices[n,j]]>; (N, k) in grad's dtype.
  m.def("gather_dot(Tensor grad, Tensor indices, Tensor weight) -> Tensor");
  // weight_grad[i] = sum_{(n,j): indices[n,j]=i} coef[n,j] * rows[n]   (num_latents, D), rows' dtype
  // coef_sum[i]    = sum_{(n,j): indices[n,j]=i} coef[n,j]             (num_latents), fp32
  // Deterministic: each latent's (n, j) pairs are reduced in increasing (n, j) order.
  m.def("sparse_t_matmul(Tensor coef, Tensor indices, Tensor rows, int num_latents) -> "
        "(Tensor weight_grad, Tensor coef_sum)");
  // ---- Matryoshka SAE: prefix decode (pyinterp/ops/prefix_decode.py) ----
  // prefixes m_0 < ... < m_{P-1} = M; latent i is in bucket b(i) = #{p : m_p <= i}.
  // out[p, n] = sum_{j: indices[n,j] < m_p} values[n,j] * weight[indices[n,j]] (+ bias): (P, N, D),
  // from one pass over each row's entries grouped by bucket. indices int32.
  m.def("prefix_decode_forward(Tensor values, Tensor indices, Tensor weight, Tensor? bias, int[] prefixes) "
        "-> Tensor");
  // Backward products; grad_suffix (P, N, D) holds G[b] = sum_{p >= b} dL/dout[p]:
  //   out[n, j] = <grad_suffix[b(i), n], weight[i]>, i = indices[n, j]             (N, k)
  m.def("prefix_gather_dot(Tensor grad_suffix, Tensor indices, Tensor weight, int[] prefixes) -> Tensor");
  //   out[i] = sum_{(n,j): indices[n,j]=i} coef[n,j] * grad_suffix[b(i), n]         (M, D), deterministic
  m.def("prefix_t_matmul(Tensor coef, Tensor indices, Tensor grad_suffix, int[] prefixes) -> Tensor");
  // ---- SAE: matching-pursuit encode (pyinterp/ops/matching_pursuit_encode.py) ----
  // x (N, D); W_dec (M, D) (the tied encoder); b_dec (D) or None; gram (M, M) = W_dec W_dec^T in the
  // accumulator dtype or None (then the scores are recomputed each step). k greedy steps per row with
  // the rules of pyinterp/reference/matching_pursuit_encode.py; values (N, k) in x's dtype, indices
  // (N, k) int32; slots of steps that are not live or after a row is done: value 0, index 0.
  m.def("matching_pursuit_forward(Tensor x, Tensor W_dec, Tensor? b_dec, Tensor? gram, int k, "
        "bool positive, float residual_threshold, bool stop_on_duplicate_support) -> "
        "(Tensor values, Tensor indices)");
  // ---- integrated Jacobians (pyinterp/ops/ij_accumulate.py) ----
  // One chunk of K quadrature nodes, added in place so that the (E, N, S, D) per-node tensor never exists:
  //   Jc[e,s,d] = sum_k weights[k] * grads[k,e,s,d]
  //   P[e,s]   += sum_d Jc[e,s,d] * delta[s,d]          Jbar[e,s,d] += Jc[e,s,d]   (Jbar only if given)
  // grads (K, E, S, D) fp32/fp16/bf16/fp64, contiguous; P (E, S) contiguous in the accumulator dtype
  // (fp32; fp64 for fp64 grads); Jbar (E, S, D) in P's dtype or None; weights (K), delta (S, D) in P's dtype.
  // Each (e, s) row is reduced by one worker in node order: deterministic, no atomics.
  m.def("ij_accumulate_(Tensor(a!) P, Tensor(b!)? Jbar, Tensor grads, Tensor weights, Tensor delta) -> ()");
  // ---- resonator networks (pyinterp/ops/resonator.py) ----
  // Factor each s[b] (+-1, int8) over F codebooks concatenated row-wise (sizes = M_f): the sign rules
  // of pyinterp/reference/resonator.py on bit-packed vectors, reproducing its trajectory exactly.
  // similarity_codebooks feed the similarities (asymmetric variant), projection_codebooks the update
  // and the readout. known (B, F) int32, -1 = unknown. activation: identity | threshold | topk;
  // threshold_units / theta_units are the integer bounds of reference.threshold_units / theta_units;
  // noise = sigma (0 = none) with the counter-based stream of seed; stop: fixed_point | similarity;
  // detect_cycles = 0 or the longest period looked for. Returns indices (B, F) int32, iterations (B)
  // int32, converged (B) bool, cycle (B) int32 (period, 0 = none), similarities (B, F) float32.
  m.def("resonator_bits(Tensor s, Tensor similarity_codebooks, Tensor projection_codebooks, "
        "int[] sizes, Tensor? known, int max_iters, bool parallel, str activation, int k, "
        "int threshold_units, float noise, int seed, str stop, int theta_units, int detect_cycles) -> "
        "(Tensor indices, Tensor iterations, Tensor converged, Tensor cycle, Tensor similarities)");
}

namespace {
bool compiled_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "pyinterp C++ CPU kernels; op schemas are registered in the pyinterp:: namespace";
  module.def("compiled_with_openmp", &compiled_with_openmp,
             "whether the CPU kernels were compiled with OpenMP (at::parallel_for threads)");
  module.def("num_threads", &at::get_num_threads, "threads at::parallel_for uses");
  module.def("compiler", []() { return std::string(__VERSION__); }, "the C++ compiler version");
  module.def("cpu_features", []() {
    pybind11::dict features;
    features["avx2"] = __builtin_cpu_supports("avx2") != 0;
    features["avx512f"] = __builtin_cpu_supports("avx512f") != 0;
    features["fma"] = __builtin_cpu_supports("fma") != 0;
    return features;
  }, "CPU features of this machine");
}
