"""Merge / unmerge a LoRA delta into a dense base weight in Triton: ``W ← W ± s · B A``, in place, tile by tile.

``W [out, in]`` (``[in, out]`` with ``fan_in_fan_out``, handled by strides), ``A [r, in]``, ``B [out, r]``. Each
program recomputes its ``[BLOCK_OUT, BLOCK_IN]`` tile of ``B A`` in fp32 from the small factors (dot precision as
``_utils.fp32_dot_precision``), so no ``[out, in]`` delta is ever allocated; the delta is rounded to W's dtype and
added, as ``reference.lora_merge`` does.

``check_finite`` (peft's ``safe_merge``) runs the kernel twice: a check pass that computes every merged tile
without writing it and raises a flag on any NaN/Inf, then, only if the flag stayed down, the write pass. On a bad
adapter ``FloatingPointError`` is raised and W is untouched.

Tiles are fixed, not autotuned: the op is memory-bound (one read and one write of W), runs once per merge, and
autotuning an in-place kernel would apply the delta once per benchmarked config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, cast, dot_acc, fp32_dot_precision, on_device, rank_block

__all__ = ["lora_merge_"]

BLOCK_OUT, BLOCK_IN, NUM_WARPS = (16, 16, 1) if INTERPRETED else (64, 128, 4)


@triton.jit
def _merge_kernel(
    weight_ptr,  # [OUT, IN] (logical; any strides)
    lora_A_ptr,  # [R, IN]
    lora_B_ptr,  # [OUT, R]
    flag_ptr,  # [1] int32: set to 1 by the check pass on NaN/Inf
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
    WRITE: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``merged = W + (scale · B A).to(W.dtype)`` on one tile; stored if ``WRITE``, else only checked."""
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    ins = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    out_ok = outs < OUT
    in_ok = ins < IN

    delta = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    rs = tl.arange(0, BLOCK_R)
    for r_start in range(0, R, BLOCK_R):
        r_ok = rs < R - r_start
        lora_B = tl.load(
            lora_B_ptr + outs[:, None] * stride_b_out + (r_start + rs)[None, :] * stride_b_r,
            mask=out_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        lora_A = tl.load(
            lora_A_ptr + (r_start + rs)[:, None] * stride_a_r + ins[None, :] * stride_a_in,
            mask=r_ok[:, None] & in_ok[None, :],
            other=0.0,
        )
        delta = dot_acc(lora_B.to(tl.float32), lora_A.to(tl.float32), delta, FP32_PRECISION)
    delta = delta * scale

    tile_ok = out_ok[:, None] & in_ok[None, :]
    weight_ptrs = (
        weight_ptr + outs.to(tl.int64)[:, None] * stride_w_out + ins.to(tl.int64)[None, :] * stride_w_in
    )
    weight = tl.load(weight_ptrs, mask=tile_ok, other=0.0)
    # As torch's `weight.add_(delta.to(weight.dtype))`: round the delta to W's dtype, add, round again.
    merged = cast(weight.to(tl.float32) + cast(delta, weight.dtype).to(tl.float32), weight.dtype)
    if WRITE:
        tl.store(weight_ptrs, merged, mask=tile_ok)
    else:
        # NaN fails `<` as well, so this flags NaN and ±Inf alike.
        not_finite = (tl.abs(merged.to(tl.float32)) < float("inf")) == 0
        bad_count = tl.sum((not_finite & tile_ok).to(tl.int32))
        # Every program that sees a bad value writes the same 1: a benign race, no atomic needed.
        tl.store(flag_ptr, 1, mask=bad_count > 0)


@torch.no_grad()
def lora_merge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool,
    subtract: bool,
    check_finite: bool,
) -> None:
    """``weight ± s · B A`` in place; see ``ops.lora_merge`` for the contract, which checks the operands first.

    ``weight [out, in]`` (``[in, out]`` when ``fan_in_fan_out``), any strides, fp32, fp16 or bf16;
    ``lora_A [r, in]``, ``lora_B [out, r]``, any strides and float dtype (read as fp32); all on one device.
    Raises ``FloatingPointError`` (W untouched) when ``check_finite`` and the merged weight would hold NaN/Inf.
    """
    rank, in_features = lora_A.shape
    out_features = lora_B.shape[0]
    logical = weight.T if fan_in_fan_out else weight  # [out, in], a view
    if weight.numel() == 0:
        return
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device)
    grid = (triton.cdiv(out_features, BLOCK_OUT), triton.cdiv(in_features, BLOCK_IN))

    def launch(write: bool) -> None:
        _merge_kernel[grid](
            logical,
            lora_A,
            lora_B,
            flag,
            out_features,
            in_features,
            rank,
            *logical.stride(),
            *lora_A.stride(),
            *lora_B.stride(),
            -float(scaling) if subtract else float(scaling),
            WRITE=write,
            FP32_PRECISION=fp32_dot_precision(),
            BLOCK_R=rank_block(rank),
            BLOCK_OUT=BLOCK_OUT,
            BLOCK_IN=BLOCK_IN,
            num_warps=NUM_WARPS,
        )

    with on_device(weight):
        if check_finite:
            launch(write=False)
            if flag.item():
                raise FloatingPointError("the merged weight would hold NaN or Inf")
        launch(write=True)
    # The kernel writes through a raw pointer; tell autograd that W changed, as `weight.add_` would.
    torch.autograd.graph.increment_version(weight)
