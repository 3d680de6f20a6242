"""Triton kernel for ij_accumulate_: one chunk of quadrature nodes of the integrated Jacobian, added in
place (math in pyinterp/reference/ij_accumulate.py, shapes in csrc/bindings.cpp).

Each program owns BLOCK_ROWS whole (e, s) rows. For each BLOCK_D slice of the feature width it sums
the K weighted gradient tiles in the accumulator dtype (P's dtype), adds the tile to Jbar when asked
and folds its dot with delta into the rows' P partial sums: one pass over grads, no atomics."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ij_accumulate_kernel(grads_ptr, weights_ptr, delta_ptr, p_ptr, jbar_ptr, rows_total, tokens,
                          node_stride, NUM_NODES: tl.constexpr, WIDTH: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_JBAR: tl.constexpr):
    # The loop bounds are constexprs: the triton 3.6 interpreter cannot take a runtime scalar as a
    # range() bound (it holds scalars as 1-element arrays, which numpy >= 2.4 refuses to int()).
    # One compile per (width, chunk size): both stay fixed along an attribution run.
    acc_ty = p_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < rows_total
    token_rows = rows % tokens
    p_partial = tl.zeros((BLOCK_ROWS,), dtype=acc_ty)
    for d0 in range(0, WIDTH, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < WIDTH)[None, :]
        row_offsets = rows[:, None] * WIDTH + cols[None, :]
        jtile = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=acc_ty)
        grad_ptrs = grads_ptr + row_offsets
        for k in range(NUM_NODES):
            weight = tl.load(weights_ptr + k)
            grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(acc_ty)
            jtile += weight * grad
            grad_ptrs += node_stride
        # Masked lanes hold 0 * weight: NaN for an infinite weight, which must not reach P.
        jtile = tl.where(mask, jtile, 0.0)
        delta = tl.load(delta_ptr + token_rows[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
        p_partial += tl.sum(jtile * delta, axis=1)
        if WRITE_JBAR:
            jbar = tl.load(jbar_ptr + row_offsets, mask=mask, other=0.0)
            tl.store(jbar_ptr + row_offsets, jbar + jtile, mask=mask)
    p_old = tl.load(p_ptr + rows, mask=row_mask, other=0.0)
    tl.store(p_ptr + rows, p_old + p_partial, mask=row_mask)


def ij_accumulate_(P: torch.Tensor, Jbar: torch.Tensor | None, grads: torch.Tensor,
                   weights: torch.Tensor, delta: torch.Tensor) -> None:
    """Validated, contiguous arguments as in the schema; adds one node chunk into P (and Jbar)."""
    num_nodes, outputs, tokens, width = grads.shape
    rows_total = outputs * tokens
    if rows_total == 0 or num_nodes == 0:
        return
    # 16 rows x up to 128 features: a 2k-element fp32 tile per node step, few programs on small shapes
    # (the CPU interpreter costs ~0.6 ms per program).
    block_rows = 16
    block_d = min(128, triton.next_power_of_2(max(width, 1)))
    grid = (triton.cdiv(rows_total, block_rows),)
    _ij_accumulate_kernel[grid](
        grads, weights, delta, P, Jbar if Jbar is not None else P, rows_total, tokens,
        rows_total * width, NUM_NODES=num_nodes, WIDTH=width, BLOCK_ROWS=block_rows, BLOCK_D=block_d, WRITE_JBAR=Jbar is not None)
