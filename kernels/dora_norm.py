"""DoRA's row norms ``‖W_o + s·B_o A‖`` in Triton, from ``‖W_o‖²``, ``W Aᵀ`` and ``A Aᵀ``, never forming ``W + s·B A``.

``W [out, in]`` (``[in, out]`` with ``fan_in_fan_out``, handled by strides), ``A [r, in]``, ``B [out, r]``, the
cached ``‖W_o‖²`` fp32 ``[out]``. One program owns ``BLOCK_OUT`` output rows and walks W's row block once per
``BLOCK_R`` chunk of the rank (once in all for r ≤ 64 on a GPU)::

    cross_o     = B_o · (W Aᵀ)_o                (W Aᵀ accumulated tile by tile, fp32, never stored)
    quadratic_o = B_o (A Aᵀ) B_oᵀ               (the [r, r] Gram matrix, computed once per call by torch)
    squared_o   = ‖W_o‖² + 2s·cross_o + s²·quadratic_o

and, as ``reference.dora_norm`` does, a row whose ``squared_o`` falls below ``cancellation · ‖W_o‖²`` is recomputed
directly as ``‖W_o + s·B_o A‖``: the program walks its row block once more, only when one of its rows needs it, so
there is no host sync and no index list. W is read in its own dtype and converted tile by tile to fp32; every
product is an fp32 dot (precision as ``_utils.fp32_dot_precision``), as the reference computes in fp32.

``weight_row_sq_norm`` (``‖W_o‖²``, the cache) is a plain row reduction in the same layout.

Tiles are fixed, not autotuned: the op reads W once per call and is memory-bound for LoRA ranks (2r flops per
element of W), so the tile only has to keep enough loads in flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, dot_acc, fp32_dot_precision, on_device, rank_block

__all__ = ["dora_norm", "weight_row_sq_norm"]

# 64 × 64 tiles on 8 warps: no register spills up to the largest rank tile (64) in the sm_90a check, where 4
# warps spill at rank 64; a 4096-row weight gives 64 programs, fewer than an H100 has SMs (unmeasured).
BLOCK_OUT, BLOCK_IN, NUM_WARPS = (16, 16, 1) if INTERPRETED else (64, 64, 8)


@triton.jit
def _weight_tile(weight_ptr, outs, ins, stride_w_out, stride_w_in, mask):
    """``W[outs, ins]`` as fp32 (zero outside ``mask``)."""
    offsets = outs.to(tl.int64)[:, None] * stride_w_out + ins.to(tl.int64)[None, :] * stride_w_in
    return tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_norm_kernel(
    weight_ptr,  # [OUT, IN] (logical; any strides), fp32/fp16/bf16
    sq_norm_ptr,  # [OUT] fp32: ‖W_o‖²
    lora_A_ptr,  # [R, IN]
    lora_B_ptr,  # [OUT, R]
    gram_ptr,  # [R, R] fp32, contiguous: A Aᵀ
    norm_ptr,  # [OUT] fp32, output
    OUT,
    IN,
    R,
    stride_w_out,
    stride_w_in,
    stride_a_r,
    stride_a_in,
    stride_b_out,
    stride_b_r,
    scale,
    cancellation,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``norm[outs] = ‖W_o + scale·B_o A‖`` for one block of output rows."""
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < OUT
    rs = tl.arange(0, BLOCK_R)
    in_offsets = tl.arange(0, BLOCK_IN)

    cross = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    quadratic = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        r_ok = rs < R - r_start
        b_mask = out_ok[:, None] & r_ok[None, :]
        lora_B = tl.load(
            lora_B_ptr + outs[:, None] * stride_b_out + (r_start + rs)[None, :] * stride_b_r,
            mask=b_mask,
            other=0.0,
        ).to(tl.float32)
        weight_times_a = tl.zeros((BLOCK_OUT, BLOCK_R), dtype=tl.float32)  # (W Aᵀ)[outs, this chunk]
        for in_start in range(0, IN, BLOCK_IN):
            ins = in_start + in_offsets
            in_ok = ins < IN
            weight = _weight_tile(
                weight_ptr, outs, ins, stride_w_out, stride_w_in, out_ok[:, None] & in_ok[None, :]
            )
            a_t = tl.load(  # Aᵀ tile [BLOCK_IN, BLOCK_R]
                lora_A_ptr + (r_start + rs)[None, :] * stride_a_r + ins[:, None] * stride_a_in,
                mask=in_ok[:, None] & r_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            weight_times_a = dot_acc(weight, a_t, weight_times_a, FP32_PRECISION)
        cross += tl.sum(lora_B * weight_times_a, axis=1)
        # B_o G B_oᵀ = Σ over chunk pairs (i, j) of B_o,i G_ij B_o,jᵀ; this chunk is i.
        for s_start in range(0, R, BLOCK_R):
            s_ok = rs < R - s_start
            gram = tl.load(
                gram_ptr + (r_start + rs)[:, None] * R + (s_start + rs)[None, :],
                mask=r_ok[:, None] & s_ok[None, :],
                other=0.0,
            )
            lora_B_j = tl.load(
                lora_B_ptr + outs[:, None] * stride_b_out + (s_start + rs)[None, :] * stride_b_r,
                mask=out_ok[:, None] & s_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            b_gram = dot_acc(lora_B, gram, tl.zeros((BLOCK_OUT, BLOCK_R), dtype=tl.float32), FP32_PRECISION)
            quadratic += tl.sum(b_gram * lora_B_j, axis=1)

    sq_norm = tl.load(sq_norm_ptr + outs, mask=out_ok, other=0.0)
    squared = sq_norm + (2.0 * scale) * cross + (scale * scale) * quadratic
    norm = tl.sqrt(tl.maximum(squared, 0.0))
    # The reference's rule, row by row: the three-term sum lost its digits to cancellation, recompute directly.
    cancelled = (squared < cancellation * sq_norm) & out_ok
    if tl.sum(cancelled.to(tl.int32)) > 0:
        direct = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        for in_start in range(0, IN, BLOCK_IN):
            ins = in_start + in_offsets
            in_ok = ins < IN
            tile = _weight_tile(
                weight_ptr, outs, ins, stride_w_out, stride_w_in, out_ok[:, None] & in_ok[None, :]
            )
            delta = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
            for r_start in range(0, R, BLOCK_R):
                r_ok = rs < R - r_start
                lora_B = tl.load(
                    lora_B_ptr + outs[:, None] * stride_b_out + (r_start + rs)[None, :] * stride_b_r,
                    mask=out_ok[:, None] & r_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                lora_A = tl.load(
                    lora_A_ptr + (r_start + rs)[:, None] * stride_a_r + ins[None, :] * stride_a_in,
                    mask=r_ok[:, None] & in_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                delta = dot_acc(lora_B, lora_A, delta, FP32_PRECISION)
            merged = tile + scale * delta
            direct += tl.sum(merged * merged, axis=1)
        norm = tl.where(cancelled, tl.sqrt(direct), norm)
    tl.store(norm_ptr + outs, norm, mask=out_ok)


@triton.jit
def _row_sq_norm_kernel(
    weight_ptr, out_ptr, OUT, IN, stride_w_out, stride_w_in, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr
):
    """``out[outs] = ‖W_o‖²`` (fp32) for one block of output rows."""
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < OUT
    total = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for in_start in range(0, IN, BLOCK_IN):
        ins = in_start + tl.arange(0, BLOCK_IN)
        tile = _weight_tile(
            weight_ptr, outs, ins, stride_w_out, stride_w_in, out_ok[:, None] & (ins < IN)[None, :]
        )
        total += tl.sum(tile * tile, axis=1)
    tl.store(out_ptr + outs, total, mask=out_ok)


def _logical(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight  # [out, in], a view


@torch.no_grad()
def weight_row_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``‖W_o‖²`` per output row, fp32 ``[out]``; ``weight`` as in ``dora_norm``."""
    logical = _logical(weight, fan_in_fan_out)
    out_features, in_features = logical.shape
    result = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    if out_features == 0:
        return result
    with on_device(weight):
        _row_sq_norm_kernel[(triton.cdiv(out_features, BLOCK_OUT),)](
            logical, result, out_features, in_features, *logical.stride(),
            BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN, num_warps=NUM_WARPS,
        )  # fmt: skip
    return result


@torch.no_grad()
def dora_norm(
    weight: torch.Tensor,
    weight_sq_norm: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    cancellation: float,
) -> torch.Tensor:
    """``‖W_o + s·B_o A‖`` per output row, fp32 ``[out]``; ``ops.dora_norm`` states the contract and checks the
    operands first. Any strides; W fp32/fp16/bf16, the factors any float dtype (read as fp32). Rows whose
    three-term squared norm is below ``cancellation · ‖W_o‖²`` are recomputed directly (the reference's
    ``CANCELLATION``, passed in by the op so that both backends apply one rule)."""
    logical = _logical(weight, fan_in_fan_out)
    out_features, in_features = logical.shape
    rank = lora_A.shape[0]
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    if out_features == 0:
        return norm
    # [r, r]: one small GEMM, as the reference computes it; the kernel reads it from global memory.
    lora_A32 = lora_A.float()
    gram = (lora_A32 @ lora_A32.T).contiguous()
    with on_device(weight):
        _row_norm_kernel[(triton.cdiv(out_features, BLOCK_OUT),)](
            logical, weight_sq_norm.float().contiguous(), lora_A, lora_B, gram, norm, out_features, in_features, rank,
            *logical.stride(), *lora_A.stride(), *lora_B.stride(), float(scaling), float(cancellation),
            FP32_PRECISION=fp32_dot_precision(), BLOCK_R=rank_block(rank), BLOCK_OUT=BLOCK_OUT,
            BLOCK_IN=BLOCK_IN, num_warps=NUM_WARPS,
        )  # fmt: skip
    return norm
