"""The memory-bound rank-r passes of the LoRA linear: projecting rows onto the rank, and the adapter gradients.

- ``project``: ``out [M, R] = scale · (keep ⊙ x) @ lora_A``, one pass over ``x [M, K]``. Named for the forward,
  ``xa = drop(x) Aᵀ`` (``lora_A = Aᵀ [in, r]``, ``scale = 1/(1-p)``), where it draws the dropout mask (the hash
  of ``_utils.dropout_keep``) and writes it, bit-packed, for the backward; the backward launches it on
  ``dy [M, out]`` and ``B [out, r]`` with ``scale = s`` and no mask, for ``dxa = s · dy B`` when ``dB`` is not
  needed (otherwise ``grad_out_pass`` computes both from one read of dy).
- ``outer``: ``(scale · (keep ⊙ x)ᵀ @ dxa)ᵀ``, a reduction over the M rows, written ``[R, K]``: ``dA = dxaᵀ drop(x)``
  (``x [M, in]``, ``dxa [M, r]``, ``scale = 1/(1-p)``, the saved mask read back). Rows are split into ranges that
  each write an fp32 partial, summed by torch in a fixed order: deterministic, no atomics.

M rows (tokens), K the features of the row operand, R the rank, as in Triton's matmul tutorial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    autotune_configs,
    cast,
    dot_acc,
    drop_threshold,
    dropout_keep,
    fp32_dot_precision,
    load_keep,
    pack_keep,
    rank_block,
    row_class,
    row_splits,
)

__all__ = ["outer", "project"]


def _project_configs() -> list[triton.Config]:
    def config(block_m, block_k, stages, warps):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_stages=stages, num_warps=warps)

    # Memory-bound: small row tiles give enough programs to fill the GPU at moderate M. Every tile holds at
    # most 32 row-operand values per thread and at most 64 columns when it hashes and packs the mask: the
    # 128-column tiles spilled compiled for sm_90a (16×128 and 32×128 with 4 warps, 64×128 with 8).
    return autotune_configs(
        [
            config(16, 64, 4, 4),
            config(32, 64, 4, 4),
            config(64, 64, 4, 4),
            config(128, 64, 3, 8),
        ],
        interpreter_config=config(16, 16, 1, 1),
    )


def _prune_project_configs(configs, named_args, **constexprs):
    """Hashing and packing the mask in tiles of fewer than 64 rows spilled registers, compiled for sm_90a."""
    if not constexprs["HAS_DROPOUT"]:
        return configs
    return [config for config in configs if config.kwargs["BLOCK_M"] >= 64] or configs[-1:]


@triton.autotune(
    configs=_project_configs(),
    key=["K", "R", "ROW_CLASS", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_project_configs},
)
@triton.jit(do_not_specialize=["M", "ROW_CLASS"])
def _project_kernel(
    x_ptr,  # [M, K]
    lora_A_ptr,  # [K, R]
    out_ptr,  # [M, R]
    seed_ptr,  # [1] int64
    bits_ptr,  # [M, ceil(K / 8)] uint8: the keep-mask, written
    M,
    K,
    R,
    stride_x_m,
    stride_x_k,
    stride_lora_A_k,
    stride_lora_A_r,
    stride_out_m,
    stride_out_r,
    stride_bits_m,
    scale,
    threshold,
    ROW_CLASS,
    HAS_DROPOUT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = scale · (keep ⊙ x) @ lora_A``: ``[M, K] → [M, R]``; ``x`` is cast to ``lora_A``'s dtype before the
    dot. With dropout, the programs of the first rank tile also write the mask, packed (``_utils.pack_keep``).
    See the module docstring for what the operands hold forward and backward."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    rows64 = rows.to(tl.int64)

    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows64[:, None] * stride_x_m + ks[None, :] * stride_x_k
    lora_A_ptrs = lora_A_ptr + ks[:, None] * stride_lora_A_k + ranks[None, :] * stride_lora_A_r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed_ptr, rows, k_start + ks, K, threshold) & k_ok[None, :]
            x = tl.where(keep, x, 0.0)
            if pid_r == 0:
                byte_cols = k_start // 8 + tl.arange(0, BLOCK_K // 8)
                tl.store(
                    bits_ptr + rows64[:, None] * stride_bits_m + byte_cols[None, :],
                    pack_keep(keep, BLOCK_M, BLOCK_K),
                    mask=row_ok[:, None] & (byte_cols < tl.cdiv(K, 8))[None, :],
                )
        lora_A = tl.load(lora_A_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = dot_acc(cast(x, lora_A.dtype), lora_A, acc, FP32_PRECISION)
        x_ptrs += BLOCK_K * stride_x_k
        lora_A_ptrs += BLOCK_K * stride_lora_A_k
    acc = acc * scale

    out_ptrs = out_ptr + rows64[:, None] * stride_out_m + ranks[None, :] * stride_out_r
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


def _outer_configs() -> list[triton.Config]:
    def config(block_k, block_m, stages, warps):
        return triton.Config({"BLOCK_K": block_k, "BLOCK_M": block_m}, num_stages=stages, num_warps=warps)

    # At most 32 row-operand values per thread, as for the projection, and row steps of 64: the 128-row steps
    # spilled compiled for sm_90a (32×128 with 4 warps, 64×128 with 8, 128×128 with 16).
    return autotune_configs(
        [
            config(32, 64, 4, 4),
            config(64, 64, 4, 4),
            config(128, 64, 3, 8),
        ],
        interpreter_config=config(16, 16, 1, 1),
    )


@triton.autotune(configs=_outer_configs(), key=["K", "R", "ROW_CLASS", "HAS_DROPOUT"])
@triton.jit(do_not_specialize=["M", "rows_per_split", "ROW_CLASS"])
def _outer_kernel(
    x_ptr,  # [M, K]
    dxa_ptr,  # [M, R]
    partial_ptr,  # [splits, K, R] (any strides), fp32
    bits_ptr,  # [M, ceil(K / 8)] uint8: the keep-mask project wrote
    M,
    K,
    R,
    rows_per_split,
    stride_x_m,
    stride_x_k,
    stride_dxa_m,
    stride_dxa_r,
    stride_partial_split,
    stride_partial_k,
    stride_partial_r,
    stride_bits_m,
    scale,
    ROW_CLASS,
    HAS_DROPOUT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``partial[split] = scale · Σ_{rows of split} (keep ⊙ x)ᵀ @ dxa``: ``[K, R]`` per row range; ``x`` is cast
    to ``dxa``'s dtype before the dot. The grid is ``(K tiles, R tiles, splits)``."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    cols64 = cols.to(tl.int64)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, M)

    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m_start in range(row_begin, row_end, BLOCK_M):
        rows = m_start + ms
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        x = tl.load(
            x_ptr + rows64[:, None] * stride_x_m + cols64[None, :] * stride_x_k,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(
                load_keep(bits_ptr, rows, pid_k * BLOCK_K, K, stride_bits_m, row_ok, BLOCK_M, BLOCK_K), x, 0.0
            )
        dxa = tl.load(
            dxa_ptr + rows64[:, None] * stride_dxa_m + ranks[None, :] * stride_dxa_r,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(tl.trans(cast(x, dxa.dtype)), dxa, acc, FP32_PRECISION)
    acc = acc * scale

    partial_ptrs = (
        partial_ptr
        + split * stride_partial_split
        + cols[:, None] * stride_partial_k
        + ranks[None, :] * stride_partial_r
    )
    tl.store(partial_ptrs, acc, mask=col_ok[:, None] & rank_ok[None, :])


def project(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    scale: float,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale · (keep ⊙ x) @ lora_A, keep bits)``: a new contiguous ``[M, R]`` tensor in ``lora_A``'s dtype and,
    with dropout, the keep-mask drawn from ``seed`` (an int64 ``[1]`` tensor on x's device) as ``[M, ceil(K / 8)]``
    uint8 (``_utils.pack_keep``'s layout), else None.

    ``x [M, K]`` (fp32, fp16 or bf16), ``lora_A [K, R]`` (fp32, fp16 or bf16), any strides, one device; ``keep``
    is all ones when ``dropout_p == 0``.
    """
    (n_rows, k), rank = x.shape, lora_A.shape[1]
    out = torch.empty(n_rows, rank, dtype=lora_A.dtype, device=x.device)
    has_dropout = dropout_p > 0.0
    bits = torch.empty(n_rows, triton.cdiv(k, 8), dtype=torch.uint8, device=x.device) if has_dropout else None
    if n_rows == 0:
        return out, bits
    block_r = rank_block(rank)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r))

    _project_kernel[grid](
        x,
        lora_A,
        out,
        seed if has_dropout else out,  # unused pointers still need a tensor
        bits if has_dropout else out,
        n_rows,
        k,
        rank,
        *x.stride(),
        *lora_A.stride(),
        *out.stride(),
        bits.stride(0) if has_dropout else 0,
        scale,
        drop_threshold(dropout_p),
        row_class(n_rows),
        HAS_DROPOUT=has_dropout,
        FP32_PRECISION=fp32_dot_precision(),
        BLOCK_R=block_r,
    )
    return out, bits


def outer(
    x: torch.Tensor,
    dxa: torch.Tensor,
    scale: float,
    *,
    keep_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(scale · (keep ⊙ x)ᵀ @ dxa)ᵀ`` → a new contiguous ``[R, K]`` tensor in ``dxa``'s dtype, summed in fp32.

    ``x [M, K]`` (fp32, fp16 or bf16), ``dxa [M, R]`` (fp32, fp16 or bf16), any strides, one device; ``keep`` is
    ``keep_bits`` (``project``'s packed mask over ``x``) when given, else all ones. ``M = 0`` gives zeros.
    """
    (n_rows, k), rank = x.shape, dxa.shape[1]
    if n_rows == 0:
        return torch.zeros(rank, k, dtype=dxa.dtype, device=x.device)
    block_r = rank_block(rank)
    # Split sizing assumes 64-wide K tiles; the autotuned BLOCK_K only changes how full the GPU is.
    splits, rows_per_split = row_splits(n_rows, triton.cdiv(k, 64) * triton.cdiv(rank, block_r), x.device)
    partial = torch.empty(splits, rank, k, dtype=torch.float32, device=x.device)
    stride_split, stride_r, stride_k = partial.stride()

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(rank, block_r), splits)

    _outer_kernel[grid](
        x,
        dxa,
        partial,
        keep_bits if keep_bits is not None else partial,  # an unused pointer still needs a tensor
        n_rows,
        k,
        rank,
        rows_per_split,
        *x.stride(),
        *dxa.stride(),
        stride_split,
        stride_k,
        stride_r,
        keep_bits.stride(0) if keep_bits is not None else 0,
        scale,
        row_class(n_rows),
        HAS_DROPOUT=keep_bits is not None,
        FP32_PRECISION=fp32_dot_precision(),
        BLOCK_R=block_r,
    )
    return partial.sum(0).to(dxa.dtype)
