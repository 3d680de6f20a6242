"""AOT-compile the Triton kernels for sm_90 (no GPU needed): shared memory, registers and local-memory
stack (spills) of each, from the cubin (cuobjdump -res-usage of Triton's bundled CUDA tools).
    .venv/bin/python benches/triton_aot_report.py ij res topk sparse mp prefix"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyinterp._kernels.triton import resonator, ij_accumulate, sparse_decode

target = GPUTarget("cuda", 90, 32)

def compile_one(name, fn, sig, constexprs, num_warps=4):
    start = time.time()
    for key, value in constexprs.items():
        sig[key] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=target, options={"num_warps": num_warps})
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    print(f"{name}: shared {md.shared} B, num_warps {md.num_warps}, bar.sync in PTX {ptx.count('bar.sync') + ptx.count('barrier.sync')}, "
          f"{time.time() - start:.0f} s", flush=True)
    cubin = Path(tempfile.mkdtemp()) / f"{name}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    print("    " + " ".join(w for w in usage.split() if w.startswith(("REG:", "STACK:", "SHARED:", "LOCAL:"))),
          flush=True)


which = sys.argv[1:]
if "ij" in which:
    compile_one("ij_accumulate", ij_accumulate._ij_accumulate_kernel,
                {"grads_ptr": "*fp32", "weights_ptr": "*fp32", "delta_ptr": "*fp32", "p_ptr": "*fp32",
                 "jbar_ptr": "*fp32", "rows_total": "i32", "tokens": "i32", "node_stride": "i64"},
                {"NUM_NODES": 8, "WIDTH": 384, "BLOCK_ROWS": 16, "BLOCK_D": 128, "WRITE_JBAR": True})
if "res" in which:
    sig = {n: "*fp32" for n in ("s_ptr", "similarity_ptr", "projection_ptr")}
    sig.update({"offsets_ptr": "*i64", "sizes_ptr": "*i32", "known_ptr": "*i32", "estimates_ptr": "*fp32",
                "running_ptr": "*fp32", "indices_ptr": "*i32", "iterations_ptr": "*i32", "converged_ptr": "*i8",
                "similarities_ptr": "*fp32"})
    sig.update({n: "i32" for n in ("D", "F", "padded_d", "max_iters", "threshold_units", "theta_units", "k")})
    for bm, bd in ((512, 16), (128, 64)):  # the GPU tiles of a 300- and a 100-codevector codebook
        compile_one(f"resonator_M{bm}_D{bd}", resonator._resonator_float_kernel, dict(sig),
                    {"PARALLEL": False, "ACTIVATION": 2, "STOP_ON_SIMILARITY": False, "HAS_KNOWN": True,
                     "BLOCK_M": bm, "BLOCK_D": bd}, num_warps=8)
if "topk" in which:
    import triton.language as tl
    from pyinterp._kernels.triton import topk_encode as te
    N, M, D, k, KA = 16384, 32768, 768, 32, 0  # gpt2-32k, the paper shape
    for dtype, ka in (("bf16", 0), ("bf16", 384)):
        K = te.pow2(max(k, 2)); KAp = te.pow2(max(ka, 2)) if ka else 0
        cfg = te.gpu_config(N, M, K, KAp, 132)
        block_m = cfg.block_m
        sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "benc_ptr": "*bf16", "bdec_ptr": "*bf16", "dead_ptr": "*i1",
               "cand_ptr": "*i64", "aux_cand_ptr": "*i64", "N": "i32", "M": "i32", "D": "i32",
               "lat_per_split": "i32", "n_splits": "i32"}
        compile_one(f"topk_encode_kaux{ka}", te._encode_kernel, sig,
                    {"HAS_BENC": True, "HAS_BDEC": True, "HAS_AUX": ka > 0, "DOT_DTYPE": tl.bfloat16,
                     "EMULATE_DOT": False, "BLOCK_N": cfg.block_n, "BLOCK_M": block_m, "BLOCK_D": cfg.block_d,
                     "LOG_BM": te._log2(block_m), "K": K, "LOG_K": te._log2(K), "KA": max(KAp, 2),
                     "LOG_KA": te._log2(max(KAp, 2)), "EXTRACT_MAX": cfg.extract_max}, num_warps=cfg.num_warps)
    width = te.pow2(8 * 32)
    compile_one("topk_finalize_w256", te._finalize_kernel,
                {"cand_ptr": "*i64", "val_ptr": "*bf16", "idx_ptr": "*i32", "N": "i32", "width": "i32", "k": "i32"},
                {"LOG_W": te._log2(width), "LOG_K": 5, "BLOCK_R": 16})
if "sparse" in which:
    compile_one("gather_sum", sparse_decode._gather_sum_kernel,
                {"val_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                 "N": "i32", "K": "i32", "D": "i32"} | ({"M": "i32"} if "M" in sparse_decode._gather_sum_kernel.arg_names else {}),
                {"HAS_BIAS": True, "ACC": __import__("triton.language").language.float32, "BLOCK_R": 1, "BLOCK_K": 8,
                 "BLOCK_D": 512})
if "mp" in which:
    import triton.language as tl
    from pyinterp._kernels.triton import matching_pursuit_encode as mp
    flags = {"HAS_BIAS": True, "POSITIVE": True, "STOP_DUPLICATE": True, "USE_THRESHOLD": True, "ACC": tl.float32,
             "BLOCK_K": 32}
    rows = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "val_ptr": "*bf16", "idx_ptr": "*i32",
            "M": "i32", "D": "i32", "K": "i32", "residual_threshold": "fp32"}
    for D, M in ((768, 32768), (4096, 131072)):  # gpt2-32k, llama8b-128k
        compile_one(f"matching_pursuit_D{D}", mp._matching_pursuit_kernel, dict(rows),
                    {**flags, "BLOCK_M": mp.latent_block(D, M, gram=False, interpreter=False), "BLOCK_D": mp.pow2(D)})
        compile_one(f"matching_pursuit_gram_D{D}", mp._matching_pursuit_gram_kernel,
                    {"s_ptr": "*fp32", **rows, "g_ptr": "*fp32", "row0": "i32"},
                    {**flags, "BLOCK_M": mp.latent_block(D, M, gram=True, interpreter=False), "BLOCK_D": mp.pow2(D)})
if "prefix" in which:
    import triton.language as tl
    from pyinterp._kernels.triton import prefix_decode as pd
    D = 768  # gpt2-32k; the GPU tiles of kernels/triton/prefix_decode.py's launchers
    compile_one("prefix_decode", pd._prefix_decode_kernel,
                {"val_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*bf16", "bias_ptr": "*bf16", "pref_ptr": "*i64",
                 "out_ptr": "*bf16", "N": "i32", "K": "i32", "D": "i32", "P": "i32"},
                {"HAS_BIAS": True, "ACC": tl.float32, "BLOCK_R": 1, "BLOCK_K": 8, "BLOCK_D": min(512, pd.pow2(D))})
    compile_one("prefix_gather_dot", pd._prefix_gather_dot_kernel,
                {"g_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*bf16", "pref_ptr": "*i64", "out_ptr": "*bf16",
                 "NK": "i64", "N": "i32", "K": "i32", "M": "i32", "D": "i32", "P": "i32"},
                {"ACC": tl.float32, "BLOCK_P": 16, "BLOCK_D": min(256, pd.pow2(D))})
    compile_one("prefix_segment_sum", pd._prefix_segment_sum_kernel,
                {"coef_ptr": "*fp32", "perm_ptr": "*i64", "seg_ptr": "*i64", "g_ptr": "*bf16", "pref_ptr": "*i64",
                 "out_ptr": "*bf16", "L": "i32", "N": "i32", "K": "i32", "D": "i32", "P": "i32"},
                {"ACC": tl.float32, "BLOCK_L": 4, "BLOCK_D": min(1024, pd.pow2(D))})
