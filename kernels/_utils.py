"""What the Triton kernels of lora_engine share: the interpreter switch, dot precision, the dropout mask.

Triton decides when a kernel is *decorated* whether it runs compiled (CUDA) or under the interpreter
(``TRITON_INTERPRET=1``, numpy on the CPU), so ``INTERPRETED`` is read once, when the kernel modules are imported,
and every choice that depends on it (tile configs, the interpreter fixes below) is made from the same value.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Two interpreter-only fixes, read by the jit helpers below as global constexprs (compiled kernels keep the fast
# paths; nothing here changes what a GPU computes):
# - the interpreter multiplies bf16 dot operands as raw bit patterns (triton-lang/triton#11584), so under it every
#   dot runs on operands upcast to fp32, exact for fp16/bf16 inputs and what the tensor cores accumulate anyway;
# - the interpreter casts fp32 → bf16 by truncation (its cast passes no rounding mode), where CUDA rounds to
#   nearest even, so under it that rounding is done in integer arithmetic first and the cast only drops bits.
DOT_IN_FP32 = tl.constexpr(INTERPRETED)
BF16_ROUND_IN_INTEGERS = tl.constexpr(INTERPRETED)


def autotune_configs(
    cuda_configs: list[triton.Config], interpreter_config: triton.Config
) -> list[triton.Config]:
    """The configs to autotune over: all on CUDA; one small fixed one under the interpreter, where a
    single config is run without benchmarking and small tiles keep odd test shapes cheap."""
    return [interpreter_config] if INTERPRETED else cuda_configs


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device: make it the tensor's (a no-op off CUDA)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for fp32 operands, following ``torch.set_float32_matmul_precision``:
    ``"highest"`` (torch's default) → ``"tf32x3"``, three TF32 tensor-core products whose sum is accurate to
    about fp32 (``"ieee"`` would run on the FMA units at a fraction of the tensor cores' rate); ``"high"`` or
    ``"medium"`` → ``"tf32"``, as torch's own fp32 matmuls then do."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def rank_block(rank: int) -> int:
    """The tile width along the LoRA rank: a power of two, at least 16 (``tl.dot``'s minimum), at most 64
    (larger ranks are walked in chunks, which bounds registers per program). Under the interpreter always 16,
    so that small test ranks already take the chunked path."""
    return 16 if INTERPRETED else min(64, max(16, triton.next_power_of_2(rank)))


# Autotuning is keyed on the layer's shape and flags plus this coarse class of the row count, never the row count
# itself: a 7B model's first step benchmarks each kernel once per (shape, dtypes, flags, row class), at most three
# times per shape, and later batch sizes reuse the choice. The row count is also unspecialized (``do_not_specialize``)
# so that it never multiplies the compiled variants: per kernel they are bounded by the pruned configs (≤ 10) ×
# the dtype and flag combinations in use, whatever the token counts.
ROW_CLASS_BOUNDS = (512, 4096)


def row_class(n_rows: int) -> int:
    """0 (≤ 512 rows: decode, small batches), 1 (≤ 4096) or 2 (more): the row count as the autotuners see it."""
    return sum(n_rows > bound for bound in ROW_CLASS_BOUNDS)


def sm_count(device: torch.device) -> int:
    """The number of streaming multiprocessors of a CUDA ``device`` (cached per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_splits(n_rows: int, programs_per_split: int, device: torch.device) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for a reduction over rows whose other grid axes give only
    ``programs_per_split`` programs: enough splits to fill the GPU about four times over, each split at
    least 128 rows so the fp32 partials stay small next to the rows they replace. Under the interpreter there
    is no GPU to fill; splits of 32 rows keep the split path exercised by small tests."""
    if device.type == "cuda":
        wanted = max(1, 4 * sm_count(device) // max(1, programs_per_split))
        splits = max(1, min(wanted, triton.cdiv(n_rows, 128)))
    else:
        splits = max(1, triton.cdiv(n_rows, 32))
    return splits, triton.cdiv(n_rows, splits)


def drop_threshold(dropout_p: float) -> int:
    """Inverted dropout drops an element when its 24-bit hash value is below this (``p · 2**24``, rounded): the
    kernels and ``reference.lora_linear`` compare against the same integer, so they keep the same elements."""
    return round(dropout_p * 2**24)


@triton.jit
def dropout_keep(seed_ptr, rows, cols, width, threshold):
    """The keep-mask of inverted dropout for the elements ``(rows[:, None], cols[None, :])`` of a row-major
    ``[*, width]`` tensor, from the int64 seed at ``seed_ptr``: the hash ``reference.lora_linear.keep_mask``
    computes with torch ops (``lowbias32`` of ``flat index + seed · 0x9E3779B9``, all mod 2**32; keep when its
    top 24 bits are ``>= threshold``). A function of the logical index only, never of strides or tiling."""
    seed = tl.load(seed_ptr).to(tl.int64)
    key = ((seed * 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
    flat = rows.to(tl.int64)[:, None] * width + cols[None, :]
    hashed = (flat & 0xFFFFFFFF).to(tl.uint32) + key
    hashed ^= hashed >> 16
    hashed *= tl.full((), 0x7FEB352D, tl.uint32)
    hashed ^= hashed >> 15
    hashed *= tl.full((), 0x846CA68B, tl.uint32)
    hashed ^= hashed >> 16
    return (hashed >> 8).to(tl.int32) >= threshold


@triton.jit
def pack_keep(keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_K]`` booleans → ``[BLOCK_M, BLOCK_K // 8]`` uint8, element ``8j + b`` of a row in bit ``b``
    (least significant first) of byte ``j``: the packed layout of the saved mask (``reference.lora_linear``)."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 8, 8)) << tl.arange(0, 8)[None, None, :]
    return tl.sum(bits, axis=2).to(tl.uint8)


@triton.jit
def load_keep(
    bits_ptr, rows, first_col, width, stride_bits_m, row_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The saved keep-mask (``pack_keep``'s layout: ``[M, ceil(width / 8)]`` bytes, row stride ``stride_bits_m``)
    of the tile ``(rows[:, None], first_col + arange(BLOCK_N)[None, :])``, ``first_col`` a multiple of 8, as
    ``[BLOCK_M, BLOCK_N]`` booleans; False on rows where ``row_ok`` is False and on columns past ``width``.

    One byte load per 8 elements, unpacked with uint8 shifts and a reshape: loading the byte of every element
    (int64 offsets and an int32 shift per element) cost the dX GEMM up to 59 more registers than the tile without
    dropout, compiled for sm_90a, and spilled its large tiles; this form stays within the same tiles."""
    byte_cols = first_col // 8 + tl.arange(0, BLOCK_N // 8)
    byte_ok = row_ok[:, None] & (byte_cols < tl.cdiv(width, 8))[None, :]
    packed = tl.load(
        bits_ptr + rows.to(tl.int64)[:, None] * stride_bits_m + byte_cols[None, :], mask=byte_ok, other=0
    )
    bits = ((packed[:, :, None] >> tl.arange(0, 8).to(tl.uint8)[None, None, :]) & 1) != 0
    return tl.reshape(bits, (BLOCK_M, BLOCK_N))


@triton.jit
def dot_acc(lhs, rhs, acc, FP32_PRECISION: tl.constexpr):
    """``acc + lhs @ rhs`` with an fp32 accumulator; operands must share a dtype (callers cast)."""
    if DOT_IN_FP32:
        lhs = lhs.to(tl.float32)
        rhs = rhs.to(tl.float32)
    if tl.constexpr(lhs.dtype == tl.float32):
        acc = tl.dot(lhs, rhs, acc, input_precision=FP32_PRECISION)
    else:
        acc = tl.dot(lhs, rhs, acc)
    return acc


@triton.jit
def dot_acc_16bit_lhs(lhs, rhs, acc, FP32_PRECISION: tl.constexpr):
    """``acc + lhs @ rhs`` with an fp32 accumulator, for an ``lhs`` whose values came from fp16 or bf16 (so they
    are exact in TF32: at most 11 significant bits) and an ``rhs`` of ``lhs``'s dtype after the cast.

    For fp32 operands at ``"tf32x3"`` precision this takes two TF32 products instead of three: ``rhs`` is split
    into its top 11 significant bits and the exact remainder, and the split of ``lhs`` (whose low part is zero) is
    skipped; the error stays about ``2**-20`` of each product, as with three passes, and the big ``lhs`` tile is not
    doubled in registers (three passes on a 16-bit ``dy`` spilled, compiled for sm_90a)."""
    if tl.constexpr(lhs.dtype == tl.float32) and tl.constexpr(FP32_PRECISION == "tf32x3"):
        rhs_high = (rhs.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        acc = dot_acc(lhs, rhs_high, acc, "tf32")
        acc = dot_acc(lhs, rhs - rhs_high, acc, "tf32")
    else:
        acc = dot_acc(lhs, rhs, acc, FP32_PRECISION)
    return acc


@triton.jit
def cast(values, dtype: tl.constexpr):
    """``values.to(dtype)``, rounding to nearest even on every backend (see ``BF16_ROUND_IN_INTEGERS``)."""
    converted = values.to(dtype)
    if BF16_ROUND_IN_INTEGERS:  # noqa: SIM102  (Triton refuses chained `A and B and C`)
        if tl.constexpr(values.dtype == tl.float32) and tl.constexpr(dtype == tl.bfloat16):
            # bf16 is the top half of fp32: add half an ulp (ties to even), keep the top 16 bits. NaNs are only
            # truncated, so that no carry turns them into Inf.
            bits = values.to(tl.uint32, bitcast=True)
            rounded = tl.where(values == values, bits + 0x7FFF + ((bits >> 16) & 1), bits)
            converted = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return converted
