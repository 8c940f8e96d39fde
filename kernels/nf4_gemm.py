"""The dequantize-inside-the-GEMM kernel of ``nf4_lora_linear``: ``y = x Wᵀ + b + s · xa Bᵀ``, W packed 4-bit.

For large row counts, the alternative to decoding W into a scratch buffer and running a dense GEMM on it: each
program owns a ``[BLOCK_M, BLOCK_N]`` output tile and, inside its K loop, decodes the ``[BLOCK_N, BLOCK_K]`` tile of
the packed weight it needs in registers (``nf4_decode``: the byte-pair table, the block's absmax with the nested
8-bit absmax decoded inline), rounds it as the buffer path does and feeds it, transposed, to ``tl.dot`` in x's
dtype (bf16/fp16 → wgmma on sm_90a). The rank-r term ``s · xa Bᵀ`` goes into the accumulator first and the bias
last, as in ``fused_linear`` (one accumulator: two spill), and y is written once. W is read 4 bits per weight
(``M / BLOCK_M`` times, from L2 mostly, thanks to the grouped program order), never written dense.

Rounding: each decoded weight is ``code · absmax`` in fp32, rounded to the state's dtype and then to x's dtype,
the launch without FMA contraction (``enable_fp_fusion=False``, as ``nf4_dequantize``): the weights that enter the
dot are bit for bit those the buffer path decodes (``bitsandbytes``' ``dequantize_4bit(...).to(x.dtype)``); only the
order of the fp32 sums differs from a dense GEMM on them.

Where it pays is a GPU question (``strategy``: timed at first use against the two buffer paths); it saves the
decode's launch and its 16-bit W, written and read back (``4 · out · in`` bytes), at the price of decoding each
weight ``M / BLOCK_M`` times. GPU performance is unmeasured. M/N/K as in Triton's matmul tutorial: M rows, N = out, K = in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import autotune_configs, cast, dot_acc, fp32_dot_precision, rank_block, row_class
from .nf4_decode import TRITON_DTYPES, absmax_operands, byte_pair_tile, decode_4bit

__all__ = ["nf4_gemm"]


def _config(block_m, block_n, block_k, stages, warps):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_stages=stages,
        num_warps=warps,
    )


# Compiled for sm_90a (tests/kernel_ops/test_kernels_compile_for_h100.py) at 8192 rows through 4096 × 11008 and
# 11008 × 4096, NF4 with double quant: every tile ``_prune_configs`` keeps runs its dots on wgmma and spills nothing.
# bf16 x with whole blocks per row (every real layer) keeps all of them (registers 102 at 64 × 64, 136 at 128 × 128,
# 224–252 at 256 × 128 and 128 × 256); the rest is pruned below. 128 × 128 × 128 spilled and overflowed shared memory.
_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 64, 3, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 32, 64, 4, 4),
]


def _prune_configs(configs, named_args, **constexprs):
    """Drop the tiles that spilled registers compiled for sm_90a, per thread: at most 64 accumulator values and
    32 decoded weights when each weight's absmax is decoded on its own (rows not made of whole blocks; 128 × 256
    and 64 × 128 spilled), at most 32 accumulator values with fp32 x's three-pass TF32 dots (64 × 64 is the largest
    that fits), and then at most 16 decoded weights per thread with per-element absmax (64 × 64 spilled 8 bytes)."""
    per_element_absmax = not (
        constexprs["WHOLE_BLOCK_ROWS"] and constexprs["BLOCKSIZE"] % 64 == 0 and constexprs["EVEN_K"]
    )
    three_pass = named_args["x_ptr"].dtype == torch.float32 and constexprs["FP32_PRECISION"] == "tf32x3"
    most_values = 32 if three_pass else (64 if per_element_absmax else 128)
    most_weights = (16 if three_pass else 32) if per_element_absmax else 64

    def fits(config):
        tile, threads = config.kwargs, 32 * config.num_warps
        return (
            tile["BLOCK_M"] * tile["BLOCK_N"] // threads <= most_values
            and tile["BLOCK_N"] * tile["BLOCK_K"] // threads <= most_weights
        )

    return [config for config in configs if fits(config)] or configs[-1:]


@triton.autotune(
    configs=autotune_configs(_CONFIGS, interpreter_config=_config(16, 16, 32, 1, 1)),
    key=["N", "K", "R", "ROW_CLASS", "BLOCKSIZE", "NESTED", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit(do_not_specialize=["M", "ROW_CLASS"])
def _nf4_gemm_kernel(
    x_ptr,  # [M, K]
    packed_ptr,  # [ceil(N·K / 2)] uint8: W [N, K] packed, row-major
    code_ptr,  # [16] fp32
    pair_table_ptr,  # [256] int64: nf4_decode.pair_table(code)
    absmax_ptr,  # [blocks] fp32, or uint8 when NESTED
    absmax2_ptr,
    code2_ptr,
    bias_ptr,  # [N]
    xa_ptr,  # [M, R], the adapters' dtype
    lora_B_ptr,  # [N, R]
    out_ptr,  # [M, N], x's dtype
    M,
    N,
    K,
    R,
    stride_x_m,
    stride_x_k,
    stride_bias,
    stride_xa_m,
    stride_xa_r,
    stride_lora_B_n,
    stride_lora_B_r,
    stride_out_m,
    stride_out_n,
    offset,
    scale,
    ROW_CLASS,  # _utils.row_class(M): the autotune key in place of M
    WEIGHT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX2_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    EVEN_K: tl.constexpr,
    WHOLE_BLOCK_ROWS: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    LOW_RANK_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out[tile] = x Wᵀ + b + scale · xa Bᵀ`` for one ``[BLOCK_M, BLOCK_N]`` tile, W decoded tile by tile."""
    # Grouped order (Triton's matmul tutorial): GROUP_M row tiles walk the same weight columns together, so each
    # packed weight tile is decoded from L2 by the group rather than fetched from HBM once per row tile.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    features = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    feature_ok = features < N
    rows64 = rows.to(tl.int64)  # rows × stride can pass 2**31 on large activations
    # Flat index of each feature's row of W (blocks cross rows); 32-bit unless W has 2**31 elements or more.
    first_element = features.to(tl.int64) * K if WIDE_INDEX else features * K

    # The rank-r term first, into the one accumulator the K loop then adds to.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ranks = tl.arange(0, BLOCK_R)
    for r_start in range(0, R, BLOCK_R):
        rank_ok = ranks < R - r_start
        xa = tl.load(
            xa_ptr + rows64[:, None] * stride_xa_m + (r_start + ranks)[None, :] * stride_xa_r,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_R]
        lora_B_t = tl.load(
            lora_B_ptr + features[None, :] * stride_lora_B_n + (r_start + ranks)[:, None] * stride_lora_B_r,
            mask=rank_ok[:, None] & feature_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        acc = dot_acc(cast(xa, lora_B_t.dtype), lora_B_t, acc, LOW_RANK_PRECISION)
    acc = acc * scale

    x_dtype = x_ptr.dtype.element_ty
    ks = tl.arange(0, BLOCK_K)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        x = tl.load(
            x_ptr + rows64[:, None] * stride_x_m + (k_start + ks)[None, :] * stride_x_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        if EVEN_K:
            # Rows start on a byte: one byte load and one pair-table load decode elements 2j and 2j + 1 of a
            # tile row, interleaved back into K order by a join (the pair stays in one thread's registers).
            even, odd, _, _ = byte_pair_tile(
                first_element, feature_ok, k_start, K, packed_ptr, code_ptr, pair_table_ptr, absmax_ptr,
                absmax2_ptr, code2_ptr, offset, BLOCKSIZE, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE, WHOLE_BLOCK_ROWS,
                True, BLOCK_K,
            )  # fmt: skip
            weight = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
        else:
            # An odd width: rows start mid-byte, so each element is decoded on its own.
            weight = decode_4bit(
                first_element[:, None] + (k_start + ks)[None, :], feature_ok[:, None] & k_ok[None, :],
                packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE, BLOCKSIZE2, NESTED,
                ABSMAX2_DTYPE,
            )  # fmt: skip
        # Past K the decoded values are finite (code · absmax, or the nested offset) and meet x's zeros.
        weight = cast(cast(weight, WEIGHT_DTYPE), x_dtype)
        acc = dot_acc(x, tl.trans(weight), acc, FP32_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + features * stride_bias, mask=feature_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_out_m + features[None, :] * stride_out_n
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & feature_ok[None, :])


def nf4_gemm(x_rows, weight4, bias, xa, lora_B, scaling: float, pair_table: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b + s · xa Bᵀ`` → a new contiguous ``[M, out]`` tensor in x's dtype.

    ``x_rows [M, in]`` (fp32, fp16 or bf16, any strides), ``weight4`` the op's ``Packed4bit`` (W ``[out, in]``),
    ``bias [out]`` in x's dtype or None, ``xa [M, r]`` and ``lora_B [out, r]`` in the adapters' dtype,
    ``pair_table`` ``nf4_decode.pair_table`` of ``weight4.code``; all on the current CUDA device (or the CPU under
    the interpreter). Nothing is mutated.
    """
    n_rows, in_features = x_rows.shape
    out_features = lora_B.shape[0]
    out = torch.empty((n_rows, out_features), dtype=x_rows.dtype, device=x_rows.device)
    if n_rows == 0 or out_features == 0:
        return out
    quant_state = weight4.quant_state

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _nf4_gemm_kernel[grid](
        x_rows, weight4.packed.reshape(-1).view(torch.uint8), weight4.code, pair_table_ptr=pair_table,
        bias_ptr=bias if bias is not None else out, xa_ptr=xa, lora_B_ptr=lora_B, out_ptr=out, M=n_rows,
        N=out_features, K=in_features, R=xa.shape[1], stride_x_m=x_rows.stride(0), stride_x_k=x_rows.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_xa_m=xa.stride(0),
        stride_xa_r=xa.stride(1), stride_lora_B_n=lora_B.stride(0), stride_lora_B_r=lora_B.stride(1),
        stride_out_m=out.stride(0), stride_out_n=out.stride(1), scale=float(scaling), ROW_CLASS=row_class(n_rows),
        WEIGHT_DTYPE=TRITON_DTYPES[quant_state.dtype], BLOCKSIZE=quant_state.blocksize,
        HAS_BIAS=bias is not None, WIDE_INDEX=out_features * in_features >= 2**31,
        EVEN_K=in_features % 2 == 0, WHOLE_BLOCK_ROWS=in_features % quant_state.blocksize == 0,
        FP32_PRECISION=fp32_dot_precision(),
        # An fp32 rank-r term landing in a 16-bit output needs no more than TF32 (as in fused_linear).
        LOW_RANK_PRECISION=fp32_dot_precision() if x_rows.dtype == torch.float32 else "tf32",
        BLOCK_R=rank_block(xa.shape[1]), enable_fp_fusion=False, **absmax_operands(quant_state),
    )  # fmt: skip
    return out
