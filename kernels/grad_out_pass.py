"""The LoRA linear's backward pass over ``dy``: ``dxa = s · dy B`` and ``dB = s · dyᵀ xa`` from one read of ``dy``.

``dy [M, N]`` (N = out features) is the largest operand of the rank-r backward, and both products need every tile
of it: reading it once for ``dxa`` and again for ``dB`` doubled the memory traffic of this memory-bound work. Here
each program reads its ``[BLOCK_M, BLOCK_N]`` tiles of ``dy`` once and feeds both dots:

- ``dxa`` rows are complete after a sweep over all N columns; the columns are split into ``splits`` ranges (to give
  the GPU enough programs when M is small) and each range writes an fp32 partial ``[splits, M, R]``;
- ``dB`` rows are sums over all M rows; each row block of ``BLOCK_M`` rows writes its own fp32 partial
  ``[row_blocks, N, R]`` (``BLOCK_M`` is chosen per dtype by ``rows_per_block``, not autotuned, so the number of
  partials is known before the launch).

Both partials are then summed by torch over their first axis, in a fixed order: no atomics, identical results run
after run (for a given shape and device: the split count depends on the SM count). Extra traffic, against the
second read of ``dy`` (``M·N·2`` bytes in 16 bits) it replaces: the partials are written and read once,
``(M/BLOCK_M)·N·R·8 + splits·M·R·8`` bytes, i.e. ``4R/BLOCK_M + 4R·splits/N`` of one read of a 16-bit ``dy``.
At r = 16, M = 8192, N = 4096 on an H100 (132 SMs): ``BLOCK_M = 256``, 5 splits, 0.25 + 0.08: about 1.33 reads'
worth of dy instead of 2 (``BLOCK_M = 128``, for an fp32 ``dy`` in three-pass dots: 0.5 + 0.06 of its larger read).

Dots: ``dy`` is cast to the adapters' dtype. With fp32 adapters and a 16-bit ``dy`` at ``"tf32x3"`` precision,
``_utils.dot_acc_16bit_lhs`` takes two TF32 products instead of three (``dy`` is exact in TF32).

Ranks above the rank tile (``_utils.rank_block``: 64 on CUDA) are walked by a grid axis, so ``dy`` is read once per
64 ranks. M/N as in Triton's matmul tutorial (M rows, N columns of the row operand), R the rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRETED,
    autotune_configs,
    cast,
    dot_acc,
    dot_acc_16bit_lhs,
    fp32_dot_precision,
    rank_block,
    row_class,
    sm_count,
)

__all__ = ["grad_out_pass"]


def rows_per_block(dy_dtype: torch.dtype, adapter_dtype: torch.dtype) -> int:
    """Rows per dB partial (the kernel's ``BLOCK_M``): as many as compile for sm_90a without spilling, 256, or 128
    when an fp32 ``dy`` goes through three-pass TF32 dots. Under the interpreter 16, so that the small test shapes
    already write several partials."""
    if INTERPRETED:
        return 16
    three_pass = dy_dtype == adapter_dtype == torch.float32 and fp32_dot_precision() == "tf32x3"
    return 128 if three_pass else 256


def _configs() -> list[triton.Config]:
    def config(block_n, stages, warps):
        return triton.Config({"BLOCK_N": block_n}, num_stages=stages, num_warps=warps)

    return autotune_configs(
        [config(32, 3, 8), config(32, 4, 8), config(64, 3, 8), config(64, 4, 8), config(32, 3, 4)],
        interpreter_config=config(16, 1, 1),
    )


def _prune_configs(configs, named_args, **constexprs):
    """Keep the tiles that compile for sm_90a without spilling (``tests/kernel_ops/sm90_compile.py``), by values of
    the ``dy`` tile per thread: at most 16 when ``dy`` itself goes through three-pass TF32 dots (fp32 ``dy``), 32
    when it is cast to fp32 for two-pass dots (fp32 adapters), 64 when it stays 16-bit."""
    adapter_dtype = named_args["lora_B_ptr"].dtype
    three_pass = named_args["dy_ptr"].dtype == adapter_dtype == torch.float32 and (
        constexprs["FP32_PRECISION"] == "tf32x3"
    )
    per_thread = 16 if three_pass else (32 if adapter_dtype == torch.float32 else 64)

    def fits(config):
        return constexprs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps) <= per_thread

    return [config for config in configs if fits(config)] or configs[:1]


@triton.autotune(
    configs=_configs(),
    key=["N", "R", "ROW_CLASS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit(do_not_specialize=["M", "ROW_CLASS"])
def _grad_out_pass_kernel(
    dy_ptr,  # [M, N]
    lora_B_ptr,  # [N, R]
    xa_ptr,  # [M, R]
    dxa_partial_ptr,  # [splits, M, R] fp32, written
    dB_partial_ptr,  # [row_blocks, N, R] fp32, written
    M,
    N,
    R,
    cols_per_split,
    stride_dy_m,
    stride_dy_n,
    stride_lora_B_n,
    stride_lora_B_r,
    stride_xa_m,
    stride_xa_r,
    stride_dxa_split,
    stride_dxa_m,
    stride_dB_block,
    stride_dB_n,
    scale,
    ROW_CLASS,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the rows of one row block, the columns of one split and the ranks of one rank tile:
    ``dxa_partial[split] = scale · dy @ lora_B`` and ``dB_partial[row block] = scale · dyᵀ @ xa``, each tile of
    ``dy`` loaded once and cast to ``lora_B``'s dtype before both dots. Grid: ``(row blocks, splits, R tiles)``."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pid_r = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    rows64 = rows.to(tl.int64)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, N)

    xa = tl.load(
        xa_ptr + rows64[:, None] * stride_xa_m + ranks[None, :] * stride_xa_r,
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    xa = cast(xa, lora_B_ptr.dtype.element_ty)
    ns = tl.arange(0, BLOCK_N)
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_start in range(col_begin, col_end, BLOCK_N):
        cols = n_start + ns
        col_ok = cols < col_end
        cols64 = cols.to(tl.int64)
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dy_m + cols64[None, :] * stride_dy_n,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        lora_B = tl.load(
            lora_B_ptr + cols64[:, None] * stride_lora_B_n + ranks[None, :] * stride_lora_B_r,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        dy = cast(dy, lora_B.dtype)
        zeros = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        if tl.constexpr(dy_ptr.dtype.element_ty != tl.float32):
            dxa = dot_acc_16bit_lhs(dy, lora_B, dxa, FP32_PRECISION)
            dB = dot_acc_16bit_lhs(tl.trans(dy), xa, zeros, FP32_PRECISION)
        else:
            dxa = dot_acc(dy, lora_B, dxa, FP32_PRECISION)
            dB = dot_acc(tl.trans(dy), xa, zeros, FP32_PRECISION)
        tl.store(
            dB_partial_ptr + pid_m * stride_dB_block + cols64[:, None] * stride_dB_n + ranks[None, :],
            dB * scale,
            mask=col_ok[:, None] & rank_ok[None, :],
        )
    tl.store(
        dxa_partial_ptr + split * stride_dxa_split + rows64[:, None] * stride_dxa_m + ranks[None, :],
        dxa * scale,
        mask=row_ok[:, None] & rank_ok[None, :],
    )


def _column_splits(n_row_blocks: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """``(splits, cols_per_split)``: enough column ranges for about one program per SM, each at least 512 columns
    (so the ``dxa`` partials cost at most 1/8 of the ``dy`` bytes at r = 16) and a multiple of 128 (every range
    starts 16-byte aligned, and the compiler knows it: loads stay vectorized). Under the interpreter ranges of 16
    columns, so that small tests already sum several partials."""
    if device.type == "cuda":
        wanted = max(1, min(triton.cdiv(sm_count(device), n_row_blocks), n_cols // 512))
        cols_per_split = triton.cdiv(triton.cdiv(n_cols, wanted), 128) * 128
    else:
        cols_per_split = 16
    return triton.cdiv(n_cols, cols_per_split), cols_per_split


def grad_out_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dxa, dB) = (scale · dy @ lora_B, scale · dyᵀ @ xa)``: new contiguous ``[M, R]`` and ``[N, R]`` tensors in
    ``lora_B``'s dtype, summed in fp32, from one read of ``dy`` (for R ≤ the rank tile).

    ``dy [M, N]`` (fp32, fp16 or bf16), ``lora_B [N, R]`` and ``xa [M, R]`` (one of fp32, fp16, bf16; ``xa`` is
    cast to ``lora_B``'s dtype), any strides, one device. ``M = 0`` gives an empty ``dxa`` and a zero ``dB``.
    Deterministic: the same operands give the same bits on the same device.
    """
    (n_rows, n_cols), rank = dy.shape, lora_B.shape[1]
    if n_rows == 0:
        return (
            torch.empty(0, rank, dtype=lora_B.dtype, device=dy.device),
            torch.zeros(n_cols, rank, dtype=lora_B.dtype, device=dy.device),
        )
    block_r, block_m = rank_block(rank), rows_per_block(dy.dtype, lora_B.dtype)
    row_blocks = triton.cdiv(n_rows, block_m)
    splits, cols_per_split = _column_splits(row_blocks, n_cols, dy.device)
    dxa_partial = torch.empty(splits, n_rows, rank, dtype=torch.float32, device=dy.device)
    dB_partial = torch.empty(row_blocks, n_cols, rank, dtype=torch.float32, device=dy.device)
    _grad_out_pass_kernel[(row_blocks, splits, triton.cdiv(rank, block_r))](
        dy,
        lora_B,
        xa,
        dxa_partial,
        dB_partial,
        n_rows,
        n_cols,
        rank,
        cols_per_split,
        *dy.stride(),
        *lora_B.stride(),
        *xa.stride(),
        *dxa_partial.stride()[:2],
        *dB_partial.stride()[:2],
        scale,
        row_class(n_rows),
        FP32_PRECISION=fp32_dot_precision(),
        BLOCK_R=block_r,
        BLOCK_M=block_m,
    )
    return dxa_partial.sum(0).to(lora_B.dtype), dB_partial.sum(0).to(lora_B.dtype)
