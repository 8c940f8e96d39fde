"""LoRA linear on a bitsandbytes 4-bit base in Triton: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``, W packed NF4/FP4.

The Triton backend's math for ``ops.nf4_lora_linear``: ``forward`` and ``backward``, with the signature of
``reference.nf4_lora_linear``. ``weight4`` is the op's ``Packed4bit`` (``packed`` bytes, ``quant_state``, and
``code``, the format's 16-entry fp32 table on the weight's device). W never exists as a saved dense tensor:

- **Small row counts** (``M ≤ GEMV_MAX_ROWS``, decode and small batches): two launches. ``low_rank.project`` computes
  ``xa = drop(x) Aᵀ [M, r]`` (and the packed dropout mask, as for the dense op), then ``_gemv_kernel`` streams the
  packed weight once: each program owns ``BLOCK_N`` output features, walks ``in`` in ``BLOCK_K`` steps decoding
  its ``[BLOCK_N, BLOCK_K]`` tile of W in registers (``nf4_decode``: code table times the block's absmax, the
  nested 8-bit absmax decoded inline), and multiplies it with all M rows of x at once, as
  ``Wtile · xᵀ`` (a tensor-core dot once the rows are padded to 16; a broadcast multiply-and-sum for a single
  row). Its epilogue adds ``s · xa Bᵀ`` (rank-r, chunked by ``BLOCK_R``) and the bias, and writes y once.
  Where ``in`` is even (every real layer) rows start on a byte: each byte is loaded once and decoded to both its
  elements, and the two halves multiply the even and the odd columns of x (no interleave). The decode is an
  autotuned choice, timed at first use like the tiles: one load from a 256-entry int64 pair table
  (``nf4_decode.code_pairs``: one lookup per byte, but a warp's 32 lookups spread over the table's sixteen
  128-byte lines) or two from the 16-entry code table (``code_nibbles``: two lookups, each warp's within one
  line). Which costs less depends on how the GPU's L1 serves scattered lookups, which could not be measured
  here. Where rows also hold whole blocks and a tile row stays inside one block, each absmax (nested decode
  included) is decoded once per tile row, not per element. An odd ``in``
  decodes element by element (``nf4_decode.decode_4bit``).
- **Large row counts**: ``low_rank.project`` as above, then one of three strategies (``strategy.NF4``: timed at
  first use per key on CUDA, ``fused`` off CUDA, forced by ``LORA_ENGINE_NF4_GEMM``): ``dequant``, the
  dequantize-inside-the-GEMM kernel (``nf4_gemm``: each output tile decodes the packed weight tiles of its K loop in
  registers, with ``s · xa Bᵀ`` and the bias in the same accumulator); or the weight decoded into a per-(device,
  dtype) scratch buffer (``nf4_dequantize(out=...)``, one launch, bit-exact) and the dense op's ``fused`` or
  ``cublas`` math on it (``kernels.lora_linear.base_and_expand``). The buffer is overwritten by the next call on
  that device and dtype, so it holds one layer's weight at a time (the largest seen so far), never one per layer.
- **Backward** (every path): when dx is needed, the weight is decoded into the buffer again and the dense
  backward (``kernels.lora_linear.backward``) runs on it with the saved ``xa`` and mask: ``fused`` after a
  ``fused`` forward, ``cublas`` otherwise. There is no dequantize-in-GEMM for dx: ``dx = dy W`` contracts over
  W's rows (out), so a tile would walk the packed weight down its columns, a different kernel than the forward's;
  after a ``dequant`` forward dx takes the buffer and cuBLAS.

How this compares with the known designs (read, not copied): bitsandbytes' ``gemv_4bit``
(``kgemm_4bit_inference_naive``) gives each warp one output row, each thread 32 nibbles (one 16-byte load) per
step with the code table in shared memory, and handles one input row; a double-quantized absmax is first decoded
by a separate launch. Unsloth's ``fast_gemv`` calls that same bnb kernel after decoding the nested absmax into a
buffer with bnb's ``dequantize_blockwise``. Here the nested absmax is decoded inline (no second launch, no
absmax buffer), up to 64 rows share one pass over the weight, and the LoRA expand rides in the epilogue.

Rounding: each decoded weight is rounded to the state's dtype and then to x's dtype (as bitsandbytes'
``dequantize_4bit(...).to(x.dtype)``), so the GEMV multiplies the same weight values as the large-row path; the
GEMV launch leaves FMA contraction on (the nested absmax may then differ from bnb's by an ulp; the ``out=`` decode
and ``nf4_gemm`` of the large-row path stay bit-exact). Sums are fp32. GPU performance is unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_linear as dense
from . import strategy
from ._utils import autotune_configs, cast, dot_acc, fp32_dot_precision, on_device, rank_block, row_class
from .low_rank import project
from .nf4_decode import TRITON_DTYPES, absmax_operands, byte_pair_tile, decode_4bit, pair_table
from .nf4_dequantize import nf4_dequantize
from .nf4_gemm import nf4_gemm

__all__ = ["GEMV_MAX_ROWS", "backward", "forward", "strategy_for"]

GEMV_MAX_ROWS = 64

# (device, dtype) → flat scratch buffer of the largest weight decoded there so far.
_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# (format, device) → nf4_decode.pair_table of its code table.
_pair_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _config(block_n, block_k, warps, stages, pair_table=True):
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "PAIR_TABLE": pair_table}, num_warps=warps, num_stages=stages
    )


# Memory-bound: small feature tiles give enough programs to stream the weight (11008 / 32 = 344 programs for an
# MLP projection). One row (no dot): at most 32 decoded weights per thread (32 × 128 with 4 warps spilled). Several
# rows (a dot): two stages and tiles of at most 64 × 64, or 32 × 128; larger ones spilled registers or overflowed
# shared memory compiled for sm_90a (tests/kernel_ops/test_kernels_compile_for_h100.py).
# Each tile with either byte decode (PAIR_TABLE, see the module docstring).
_ROW_TILES = [(16, 256, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 256, 8, 3)]
_DOT_TILES = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (64, 64, 8, 2)]
_ROW_CONFIGS = [_config(*tile, pair_table) for tile in _ROW_TILES for pair_table in (True, False)]
_DOT_CONFIGS = [_config(*tile, pair_table) for tile in _DOT_TILES for pair_table in (True, False)]


def _prune_gemv_configs(configs, named_args, **constexprs):
    """The one-row configs for one row, the dot configs otherwise (the interpreter's single config for both)."""
    kept = [config for config in configs if (config in _ROW_CONFIGS) == (constexprs["BLOCK_M"] == 1)]
    return kept or configs


@triton.jit
def _accumulate(
    weight,
    x_ptr,
    rows,
    cols,
    col_ok,
    row_ok,
    stride_x_m,
    stride_x_k,
    acc,
    WEIGHT_DTYPE,
    BLOCK_M,
    FP32_PRECISION,
):
    """``acc [BLOCK_N, BLOCK_M] + weight · x[rows, cols]ᵀ``: ``weight`` (fp32 decoded values of W's columns
    ``cols``) rounded to ``WEIGHT_DTYPE`` and then x's dtype first, as bnb's ``dequantize_4bit(...).to(x.dtype)``."""
    x_dtype = x_ptr.dtype.element_ty
    weight = cast(cast(weight, WEIGHT_DTYPE), x_dtype)
    x_t = tl.load(
        x_ptr + rows[None, :] * stride_x_m + cols[:, None] * stride_x_k,
        mask=col_ok[:, None] & row_ok[None, :],
        other=0.0,
    )  # [columns, BLOCK_M]
    if BLOCK_M == 1:
        acc += tl.sum(weight.to(tl.float32)[:, :, None] * x_t.to(tl.float32)[None, :, :], axis=1)
    else:
        acc = dot_acc(weight, x_t, acc, FP32_PRECISION)
    return acc


@triton.autotune(
    configs=autotune_configs(_ROW_CONFIGS + _DOT_CONFIGS, interpreter_config=_config(16, 32, 1, 1)),
    key=["N", "K", "R", "BLOCK_M", "BLOCKSIZE", "NESTED", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_gemv_configs},
)
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAIR_TABLE: tl.constexpr,
):
    """``out[:, tile] = x Wᵀ + b + scale · xa Bᵀ`` for one tile of ``BLOCK_N`` output features and all ``M ≤
    BLOCK_M`` rows, W decoded from 4 bits on the fly. Computed transposed, ``[BLOCK_N, BLOCK_M]``, so that the
    decoded tile is the dot's left operand and the rows its (narrow) right one. ``BLOCK_M == 1``: one row, no
    dot (a broadcast multiply and a sum over K)."""
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # Flat index of each feature's row of W (blocks cross rows); 32-bit unless W has 2**31 elements or more.
    first_element = features.to(tl.int64) * K if WIDE_INDEX else features * K

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        if EVEN_K:
            # Rows start on a byte: byte j of the tile row holds elements 2j and 2j + 1, decoded from one byte
            # load; they multiply the even and the odd columns of x: no interleave.
            even, odd, pairs, pair_ok = byte_pair_tile(
                first_element, feature_ok, k_start, K, packed_ptr, code_ptr, pair_table_ptr, absmax_ptr,
                absmax2_ptr, code2_ptr, offset, BLOCKSIZE, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE, WHOLE_BLOCK_ROWS,
                PAIR_TABLE, BLOCK_K,
            )  # fmt: skip
            acc = _accumulate(
                even, x_ptr, rows, 2 * pairs, pair_ok, row_ok, stride_x_m, stride_x_k, acc,
                WEIGHT_DTYPE, BLOCK_M, FP32_PRECISION,
            )  # fmt: skip
            acc = _accumulate(
                odd, x_ptr, rows, 2 * pairs + 1, pair_ok, row_ok, stride_x_m, stride_x_k, acc,
                WEIGHT_DTYPE, BLOCK_M, FP32_PRECISION,
            )  # fmt: skip
        else:
            # An odd width: rows start mid-byte, so each element is decoded on its own.
            k = k_start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            weight = decode_4bit(
                first_element[:, None] + k[None, :], feature_ok[:, None] & k_ok[None, :], packed_ptr, code_ptr,
                absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE,
            )  # fmt: skip
            acc = _accumulate(
                weight, x_ptr, rows, k, k_ok, row_ok, stride_x_m, stride_x_k, acc, WEIGHT_DTYPE, BLOCK_M,
                FP32_PRECISION,
            )  # fmt: skip

    # The rank-r expand, s · xa Bᵀ, in chunks of BLOCK_R ranks.
    low_rank = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        ranks = r_start + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        lora_B = tl.load(
            lora_B_ptr + features[:, None] * stride_lora_B_n + ranks[None, :] * stride_lora_B_r,
            mask=feature_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_R]
        xa_t = tl.load(
            xa_ptr + rows[None, :] * stride_xa_m + ranks[:, None] * stride_xa_r,
            mask=rank_ok[:, None] & row_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_M]
        if BLOCK_M == 1:
            low_rank += tl.sum(lora_B.to(tl.float32)[:, :, None] * xa_t.to(tl.float32)[None, :, :], axis=1)
        else:
            low_rank = dot_acc(lora_B, xa_t, low_rank, LOW_RANK_PRECISION)
    acc += scale * low_rank
    if HAS_BIAS:
        bias = tl.load(bias_ptr + features * stride_bias, mask=feature_ok, other=0.0)
        acc += bias.to(tl.float32)[:, None]

    out_ptrs = out_ptr + rows[None, :] * stride_out_m + features[:, None] * stride_out_n
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=feature_ok[:, None] & row_ok[None, :])


def _gemv(x_rows, weight4, bias, xa, lora_B, scaling) -> torch.Tensor:
    """``[M, in]`` → ``[M, out]`` in x's dtype through ``_gemv_kernel``; ``M ≤ GEMV_MAX_ROWS``."""
    n_rows, in_features = x_rows.shape
    out_features = lora_B.shape[0]
    out = torch.empty((n_rows, out_features), dtype=x_rows.dtype, device=x_rows.device)
    # One row: no dot. More: a dot, whose operands need at least 16 rows (padding is masked).
    block_m = 1 if n_rows == 1 else max(16, triton.next_power_of_2(n_rows))
    low_rank_precision = fp32_dot_precision() if x_rows.dtype == torch.float32 else "tf32"
    quant_state = weight4.quant_state
    _gemv_kernel[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)](
        x_rows, weight4.packed.reshape(-1).view(torch.uint8), weight4.code,
        pair_table_ptr=_pair_table(quant_state.quant_type, weight4.code),
        bias_ptr=bias if bias is not None else out, xa_ptr=xa, lora_B_ptr=lora_B, out_ptr=out, M=n_rows,
        N=out_features, K=in_features, R=xa.shape[1], stride_x_m=x_rows.stride(0), stride_x_k=x_rows.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0, stride_xa_m=xa.stride(0),
        stride_xa_r=xa.stride(1), stride_lora_B_n=lora_B.stride(0), stride_lora_B_r=lora_B.stride(1),
        stride_out_m=out.stride(0), stride_out_n=out.stride(1), scale=float(scaling),
        WEIGHT_DTYPE=TRITON_DTYPES[quant_state.dtype], BLOCKSIZE=quant_state.blocksize,
        HAS_BIAS=bias is not None, WIDE_INDEX=out_features * in_features >= 2**31,
        EVEN_K=in_features % 2 == 0, WHOLE_BLOCK_ROWS=in_features % quant_state.blocksize == 0, FP32_PRECISION=fp32_dot_precision(), LOW_RANK_PRECISION=low_rank_precision,
        BLOCK_M=block_m, BLOCK_R=rank_block(xa.shape[1]), **absmax_operands(quant_state),
    )  # fmt: skip
    return out


def _pair_table(quant_type: str, code: torch.Tensor) -> torch.Tensor:
    """``nf4_decode.pair_table`` of the format's code table, built once per format and device."""
    key = (quant_type, code.device)
    if key not in _pair_tables:
        _pair_tables[key] = pair_table(code)
    return _pair_tables[key]


def decoded_weight(weight4, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype``, decoded into this device's and dtype's scratch buffer (grown
    to the largest weight seen). Valid until the next call for the same device and dtype; never keep it."""
    quant_state = weight4.quant_state
    shape = tuple(quant_state.shape)
    numel = shape[0] * shape[1]
    key = (weight4.packed.device, dtype)
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _buffers[key] = torch.empty(numel, dtype=dtype, device=weight4.packed.device)
    return nf4_dequantize(weight4.packed, quant_state, weight4.code, out=buffer[:numel].view(shape))


def _strategy_key(n_rows, x, quant_state, lora_A):
    """What ``strategy.choose`` caches the 4-bit forward's timing under (the backward reads it back). As for the
    dense op, the bias is not part of it: one more vector in the epilogue does not change which GEMM wins."""
    out_features, in_features = tuple(quant_state.shape)
    return (
        "nf4", row_class(n_rows), in_features, out_features, lora_A.shape[0], x.dtype, lora_A.dtype,
        quant_state.quant_type, quant_state.blocksize, quant_state.nested, quant_state.dtype,
        x.device,
    )  # fmt: skip


def strategy_for(n_rows: int, x: torch.Tensor, quant_state, lora_A: torch.Tensor) -> str | None:
    """Read-only: what a forward with ``n_rows`` rows of ``x``'s dtype and device runs: ``"gemv"`` for 1 to
    ``GEMV_MAX_ROWS`` rows, else ``strategy.NF4``'s choice (``strategy.current``; None: ``auto`` has not timed it
    yet). Reads only ``quant_state``'s ``shape``, ``quant_type``, ``blocksize``, ``nested`` and ``dtype`` and the
    tensors' shapes, dtypes and devices, so empty ``[0, in]`` and ``[r, in]`` tensors will do."""
    if 0 < n_rows <= GEMV_MAX_ROWS:
        return "gemv"
    return strategy.current(_strategy_key(n_rows, x, quant_state, lora_A), n_rows, x.device, strategy.NF4)


def _large_rows(strategy_name, x_rows, weight4, bias, xa, lora_B, scaling) -> torch.Tensor:
    """``x Wᵀ + b + s · xa Bᵀ`` → ``[M, out]`` in x's dtype by ``strategy_name`` (``strategy.NF4``'s)."""
    if strategy_name == "dequant":
        pair_table_ = _pair_table(weight4.quant_state.quant_type, weight4.code)
        return nf4_gemm(x_rows, weight4, bias, xa, lora_B, scaling, pair_table_)
    weight = decoded_weight(weight4, x_rows.dtype)
    return dense.base_and_expand(strategy_name, x_rows, weight, bias, xa, lora_B, scaling)


def forward(x, weight4, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y [..., out], xa [M, r], keep_bits)`` as ``kernels.lora_linear.forward`` returns them, for the 4-bit
    weight ``weight4``; operands as ``ops.nf4_lora_linear`` checks them (x, bias in one of fp32/fp16/bf16; A, B
    in one of them; one CUDA device, or the CPU under the interpreter)."""
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    with on_device(x):
        x_rows = x.reshape(-1, x.shape[-1])
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        xa, keep_bits = project(x_rows, lora_A.T, keep_scale, seed, dropout_p)
        if 0 < n_rows <= GEMV_MAX_ROWS:
            out = _gemv(x_rows, weight4, bias, xa, lora_B, scaling)
        elif n_rows == 0:  # nothing to compute, nothing to decode
            out = x_rows.new_empty((0, lora_B.shape[0]))
        else:
            candidates = {
                name: lambda name=name: _large_rows(name, x_rows, weight4, bias, xa, lora_B, scaling)
                for name in strategy.NF4.strategies
            }
            key = _strategy_key(n_rows, x, weight4.quant_state, lora_A)
            chosen = strategy.choose(key, n_rows, x.device, candidates, strategy.NF4)
            out = _large_rows(chosen, x_rows, weight4, bias, xa, lora_B, scaling)
    return out.reshape(*x.shape[:-1], out.shape[-1]), xa, keep_bits


def backward(grad_out, x, weight4, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, needs):
    """``(dx, dA, dB)``, each None unless ``needs`` asks for it: the dense backward on the weight decoded again
    (only when dx is needed: dA and dB do not read W), its dx GEMM ``fused`` after a ``fused`` forward, ``cublas``
    otherwise."""
    weight = decoded_weight(weight4, x.dtype) if needs[0] else None
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    forward_choice = strategy.current(
        _strategy_key(n_rows, x, weight4.quant_state, lora_A), n_rows, x.device, strategy.NF4
    )
    dx_strategy = "fused" if forward_choice == "fused" else "cublas"
    return dense.backward(
        grad_out, x, weight, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, False, needs, dx_strategy
    )
