"""The fused GEMM of the LoRA linear: a base matmul whose output tiles start from the rank-r term.

``out = x @ weight + bias + scale · keep ⊙ (xa @ lora_B)``, one launch, no ``[M, N]`` delta ever stored. Names
follow the forward, which launches it on ``x [M, K]``, ``weight = Wᵀ [K, N]``, ``xa = drop(x) Aᵀ [M, R]``,
``lora_B = Bᵀ [R, N]``, ``scale = s`` and no mask. The backward for x launches the same kernel on ``dy [M, out]``,
``W [out, in]``, ``dxa [M, r]`` and ``A [r, in]`` with ``scale = 1/(1-p)`` and the keep-mask the forward saved
(bit-packed, read back, never redrawn), so there ``K = out`` and
``N = in``. M/N/K as in Triton's matmul tutorial: M rows (tokens), N output columns, K the reduced dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import autotune_configs, cast, dot_acc, fp32_dot_precision, load_keep, rank_block, row_class

__all__ = ["fused_linear"]


def _configs() -> list[triton.Config]:
    def config(block_m, block_n, block_k, stages, warps):
        return triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )

    return autotune_configs(
        [
            config(128, 256, 64, 3, 8),
            config(256, 128, 64, 3, 8),
            config(128, 128, 64, 4, 4),
            config(128, 128, 32, 4, 4),
            config(64, 256, 32, 4, 4),
            config(128, 64, 32, 4, 4),
            config(64, 128, 32, 4, 4),
            config(128, 64, 64, 4, 8),
            config(64, 128, 64, 4, 8),
            config(64, 64, 64, 4, 4),
        ],
        interpreter_config=config(16, 16, 16, 1, 1),
    )


SHARED_MEMORY_BUDGET = 200 * 1024  # of an H100's 227 KiB per block, leaving room for layout conversions


def _prune_configs(configs, named_args, **constexprs):
    """Drop the tiles that spill registers or overflow shared memory for this call, as measured by compiling every
    config for sm_90a (``tests/kernel_ops/sm90_compile.py``): a tile's fp32 accumulator may hold at most 64 values
    per thread with three-pass TF32 dots or when it adds into an existing output (the ``cublas`` epilogue), 128
    otherwise, with or without the dropout mask (read one byte per 8 values: ``_utils.load_keep``). (Drawing
    Philox per value, before the mask was saved, allowed 32; a byte load and shift per value, 64.)"""
    x, xa = named_args["x_ptr"], named_args["xa_ptr"]
    three_pass = (
        constexprs["HAS_BASE"] and x.dtype == torch.float32 and constexprs["FP32_PRECISION"] == "tf32x3"
    ) or (xa.dtype == torch.float32 and constexprs["LOW_RANK_PRECISION"] == "tf32x3")
    per_thread = 64 if three_pass or constexprs["ACCUMULATE"] else 128
    element_size = x.element_size() if constexprs["HAS_BASE"] else 0

    def fits(config):
        tile = config.kwargs
        values = tile["BLOCK_M"] * tile["BLOCK_N"] // (32 * config.num_warps)
        staged = config.num_stages * (tile["BLOCK_M"] + tile["BLOCK_N"]) * tile["BLOCK_K"] * element_size
        return values <= per_thread and staged <= SHARED_MEMORY_BUDGET

    return [config for config in configs if fits(config)] or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["N", "K", "R", "ROW_CLASS", "HAS_BASE", "HAS_BIAS", "HAS_DROPOUT", "ACCUMULATE"],
    restore_value=["out_ptr"],  # benchmarking an accumulating launch must not add into `out` again and again
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit(do_not_specialize=["M", "ROW_CLASS"])
def _fused_linear_kernel(
    x_ptr,  # [M, K]
    weight_ptr,  # [K, N]
    bias_ptr,  # [N]
    xa_ptr,  # [M, R]
    lora_B_ptr,  # [R, N]
    out_ptr,  # [M, N]
    bits_ptr,  # [M, ceil(N / 8)] uint8: the saved keep-mask over the output
    M,
    N,
    K,
    R,
    stride_x_m,
    stride_x_k,
    stride_weight_k,
    stride_weight_n,
    stride_bias,
    stride_xa_m,
    stride_xa_r,
    stride_lora_B_r,
    stride_lora_B_n,
    stride_out_m,
    stride_out_n,
    stride_bits_m,
    scale,
    ROW_CLASS,  # _utils.row_class(M): the autotune key in place of M
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    LOW_RANK_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = x @ weight + bias + scale · keep ⊙ (xa @ lora_B)`` (``out +=`` when ``ACCUMULATE``), one
    ``[BLOCK_M, BLOCK_N]`` tile per program; see the module docstring for what the operands hold."""
    # Grouped program order: GROUP_M row tiles sweep the column tiles together, so the weight tiles they share
    # are reused from L2 instead of reloaded from HBM.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # int64 offsets: rows × stride can pass 2**31 on large activations.
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    # The rank-r term first, into the one accumulator the GEMM then adds to: a separate [BLOCK_M, BLOCK_N]
    # accumulator for it would double the registers a tile needs and spill. The rank is walked in BLOCK_R chunks.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rs = tl.arange(0, BLOCK_R)
    for r_start in range(0, R, BLOCK_R):
        r_ok = rs < R - r_start
        xa = tl.load(
            xa_ptr + rows64[:, None] * stride_xa_m + (r_start + rs)[None, :] * stride_xa_r,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        lora_B = tl.load(
            lora_B_ptr + (r_start + rs)[:, None] * stride_lora_B_r + cols64[None, :] * stride_lora_B_n,
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(cast(xa, lora_B.dtype), lora_B, acc, LOW_RANK_PRECISION)
    acc = acc * scale
    if HAS_DROPOUT:
        acc = tl.where(
            load_keep(bits_ptr, rows, pid_n * BLOCK_N, N, stride_bits_m, row_ok, BLOCK_M, BLOCK_N), acc, 0.0
        )

    if HAS_BASE:
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows64[:, None] * stride_x_m + ks[None, :] * stride_x_k
        weight_ptrs = weight_ptr + ks[:, None] * stride_weight_k + cols64[None, :] * stride_weight_n
        for k_start in range(0, K, BLOCK_K):
            k_ok = ks < K - k_start
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            weight = tl.load(weight_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_acc(x, weight, acc, FP32_PRECISION)
            x_ptrs += BLOCK_K * stride_x_k
            weight_ptrs += BLOCK_K * stride_weight_k
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols64 * stride_bias, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows64[:, None] * stride_out_m + cols64[None, :] * stride_out_n
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_linear(
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    keep_bits: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight + bias + scale · keep ⊙ (xa @ lora_B)`` → a new contiguous ``[M, N]`` tensor in ``out_dtype``.

    ``x [M, K]`` and ``weight [K, N]``, both or neither (then only the rank-r term), one dtype (fp32, fp16 or
    bf16); ``bias [N]`` or None; ``xa [M, R]`` and ``lora_B [R, N]`` in the adapters' dtype (``xa`` is cast to
    ``lora_B``'s). Any strides; all on the current CUDA device (or the CPU under the interpreter). ``keep`` is
    ``keep_bits``, a packed mask over the ``[M, N]`` output (``[M, ceil(N / 8)]`` uint8, ``_utils.pack_keep``'s
    layout, any row stride), when given, else all ones.

    With ``out`` (``[M, N]``, any strides, its dtype taking the place of ``out_dtype``) the result is added into it
    in place, in fp32 and rounded once, and ``out`` is returned: the ``cublas`` strategy's rank-r epilogue, after
    torch computed the base GEMM into ``out``.
    """
    n_rows, (rank, n_cols) = xa.shape[0], lora_B.shape
    accumulate = out is not None
    if not accumulate:
        out = torch.empty(n_rows, n_cols, dtype=out_dtype, device=xa.device)
    if n_rows == 0:
        return out
    has_base = x is not None
    k = x.shape[1] if has_base else 0
    # Unused pointer arguments still need a tensor; their strides are never read.
    x_strides = x.stride() if has_base else (0, 0)
    weight_strides = weight.stride() if has_base else (0, 0)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]),)

    _fused_linear_kernel[grid](
        x if has_base else out,
        weight if has_base else out,
        bias if bias is not None else out,
        xa,
        lora_B,
        out,
        keep_bits if keep_bits is not None else out,
        n_rows,
        n_cols,
        k,
        rank,
        *x_strides,
        *weight_strides,
        bias.stride(0) if bias is not None else 0,
        *xa.stride(),
        *lora_B.stride(),
        *out.stride(),
        keep_bits.stride(0) if keep_bits is not None else 0,
        scale,
        row_class(n_rows),
        HAS_BASE=has_base,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=keep_bits is not None,
        ACCUMULATE=accumulate,
        FP32_PRECISION=fp32_dot_precision(),
        # An fp32 rank-r term that lands in a 16-bit output needs no more than TF32's 11 significant bits; the
        # three-pass product would only cost registers (and spill, compiled for sm_90a).
        LOW_RANK_PRECISION=fp32_dot_precision() if out_dtype == torch.float32 else "tf32",
        BLOCK_R=rank_block(rank),
    )
    return out
