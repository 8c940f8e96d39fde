"""The one decode of bitsandbytes' packed 4-bit weights (NF4/FP4, optionally double-quantized) inside a kernel.

Shared by every kernel that reads a 4-bit weight: ``nf4_dequantize`` (decode to a dense weight), ``nf4_merge``
(decode, add, quantize again) and ``nf4_lora_linear`` (decode inside the GEMV). Element by element
(``decode_4bit`` = ``code_values`` × ``block_scale``), or, where rows start on a byte, both elements of a byte at
once (``code_pairs`` from ``pair_table``, or ``code_nibbles`` from the code table) times the same ``block_scale``. The format is described in
``reference/nf4_dequantize.py``; in short, element ``e`` of the row-major flattened weight decodes to
``code[nibble(e)] * absmax[e // BLOCKSIZE]`` in fp32, the high nibble of byte ``e // 2`` first, and with double
quant ``absmax`` is itself decoded from 8 bits: ``((code2[q] * absmax2[block // BLOCKSIZE2]) → ABSMAX2_DTYPE)
+ offset → ABSMAX2_DTYPE → fp32``.

Bit-exactness with bitsandbytes needs the nested absmax's multiply and add rounded separately: every launch of a
kernel calling ``decode_4bit`` passes ``enable_fp_fusion=False`` so the compiler cannot contract them into an FMA
(which would round once); the interpreter never fuses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast

__all__ = [
    "TRITON_DTYPES",
    "absmax_operands",
    "block_scale",
    "byte_pair_tile",
    "code_nibbles",
    "code_pairs",
    "code_values",
    "decode_4bit",
    "pair_table",
]

TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def absmax_operands(quant_state) -> dict:
    """The kernel arguments that describe a ``QuantState``'s block scales, plain or nested, as ``decode_4bit``
    takes them (``absmax_ptr``, ``absmax2_ptr``, ``code2_ptr``, ``offset``, ``BLOCKSIZE2``, ``NESTED``,
    ``ABSMAX2_DTYPE``).

    Unnested, ``absmax_ptr`` is the fp32 absmax and the nested pointers are dummies the kernel never reads.
    """
    absmax = quant_state.absmax.reshape(-1)
    if not quant_state.nested:
        return {
            "absmax_ptr": absmax, "absmax2_ptr": absmax, "code2_ptr": absmax, "offset": 0.0,
            "BLOCKSIZE2": 1, "NESTED": False, "ABSMAX2_DTYPE": tl.float32,
        }  # fmt: skip
    state2 = quant_state.state2
    return {
        "absmax_ptr": absmax, "absmax2_ptr": state2.absmax.reshape(-1), "code2_ptr": state2.code,
        # A 0-dim fp32 tensor: its value is exactly representable as the fp32 scalar argument.
        "offset": float(quant_state.offset), "BLOCKSIZE2": state2.blocksize, "NESTED": True,
        "ABSMAX2_DTYPE": TRITON_DTYPES[state2.dtype],
    }  # fmt: skip


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """``code_pairs``' table: int64 ``[256]``, entry ``b`` holding the fp32 codes of byte ``b``'s two nibbles,
    ``code[b >> 4]`` (the first element) in its low 32 bits and ``code[b & 15]`` in its high 32 bits."""
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=-1)  # [256, 2] fp32
    return pairs.contiguous().view(torch.int64).reshape(256)  # little-endian: the first code is the low half


@triton.jit
def code_pairs(byte_indices, mask, packed_ptr, pair_table_ptr):
    """``(first, second)``: the fp32 codes of the two elements packed in the bytes ``byte_indices`` (elements
    ``2b`` and ``2b + 1``), from one byte load and one 8-byte table load (``pair_table``) for both."""
    packed = tl.load(packed_ptr + byte_indices, mask=mask, other=0).to(tl.int32)
    pair = tl.load(pair_table_ptr + packed)
    first = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    second = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return first, second


@triton.jit
def code_nibbles(byte_indices, mask, packed_ptr, code_ptr):
    """``code_pairs``' result from one byte load and two loads from the 16-entry fp32 code table (64 bytes: one
    cache line, where the 2 KB pair table spans sixteen, so that a warp's lookups hit fewer lines)."""
    packed = tl.load(packed_ptr + byte_indices, mask=mask, other=0).to(tl.int32)
    return tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 0xF))


@triton.jit
def block_scale(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE):
    """The fp32 absmax of 4-bit blocks ``block`` (an int tile of block indices), decoding the nested absmax when
    ``NESTED``. A kernel whose tile rows each lie in one block calls it once per row, not per element."""
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        code2 = tl.load(code2_ptr + quantized, mask=mask, other=0.0)
        scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        decoded = cast(code2 * scale2, ABSMAX2_DTYPE).to(tl.float32)
        scale = cast(decoded + offset, ABSMAX2_DTYPE).to(tl.float32)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def byte_pair_tile(
    first_element,
    feature_ok,
    k_start,
    K,
    packed_ptr,
    code_ptr,
    pair_table_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    BLOCKSIZE,
    BLOCKSIZE2,
    NESTED,
    ABSMAX2_DTYPE,
    WHOLE_BLOCK_ROWS,
    PAIR_TABLE,
    BLOCK_K,
):
    """``(even, odd, pairs, pair_ok)``: the fp32 decoded weights of columns ``2 · pairs`` (``even``) and
    ``2 · pairs + 1`` (``odd``), each ``[features, BLOCK_K // 2]``, of the rows starting at the flat element
    indices ``first_element`` (``[features]``, every row starting on a byte: K even), for the ``BLOCK_K`` columns
    from ``k_start``; 0 outside ``feature_ok`` and past K (``pair_ok`` False). Each byte is loaded once and
    decoded to both its elements (``code_pairs`` when ``PAIR_TABLE``, else ``code_nibbles``); where rows hold
    whole blocks (``WHOLE_BLOCK_ROWS``) and ``BLOCK_K`` divides the blocksize, each tile row's absmax (nested
    decode included) is decoded once, not per element."""
    pairs = k_start // 2 + tl.arange(0, BLOCK_K // 2)
    pair_ok = pairs < K // 2
    in_bounds = feature_ok[:, None] & pair_ok[None, :]
    byte_indices = first_element[:, None] // 2 + pairs[None, :]
    if PAIR_TABLE:
        first, second = code_pairs(byte_indices, in_bounds, packed_ptr, pair_table_ptr)
    else:
        first, second = code_nibbles(byte_indices, in_bounds, packed_ptr, code_ptr)
    if tl.constexpr(WHOLE_BLOCK_ROWS and BLOCKSIZE % BLOCK_K == 0):
        absmax = block_scale(
            (first_element + k_start) // BLOCKSIZE, feature_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset,
            BLOCKSIZE2, NESTED, ABSMAX2_DTYPE,
        )[:, None]  # fmt: skip
    else:
        absmax = block_scale(
            (2 * byte_indices) // BLOCKSIZE, in_bounds, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE2,
            NESTED, ABSMAX2_DTYPE,
        )  # fmt: skip
    return first * absmax, second * absmax, pairs, pair_ok


@triton.jit
def code_values(elements, mask, packed_ptr, code_ptr):
    """fp32 ``code[nibble(e)]`` for the flat element indices ``elements`` (an int tile, 1-D or 2-D) of a packed
    4-bit weight (``packed_ptr``: its bytes, high nibble first; ``code_ptr``: the 16-entry fp32 table)."""
    packed = tl.load(packed_ptr + elements // 2, mask=mask, other=0).to(tl.int32)
    index = (packed >> (4 - 4 * (elements % 2)).to(tl.int32)) & 0xF
    if len(index.shape) == 2:
        # A 2-D tile (the GEMV's): a load through L1 from the 64-byte table. A register gather needs the table
        # repeated along the rows and, compiled for sm_90a, goes through shared memory and spills.
        values = tl.load(code_ptr + index)
    else:
        # The 16-entry table in registers: a gather, not a load per element.
        values = tl.gather(tl.load(code_ptr + tl.arange(0, 16)), index, 0)
    return values


@triton.jit
def decode_4bit(
    elements,
    mask,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    BLOCKSIZE,
    BLOCKSIZE2,
    NESTED,
    ABSMAX2_DTYPE,
):
    """fp32 ``code[nibble(e)] * absmax[e // BLOCKSIZE]`` for the flat element indices ``elements`` (an int tile,
    1-D or 2-D) of a packed 4-bit weight; 0 where ``mask`` is False. The rest as ``absmax_operands`` gives it."""
    scale = block_scale(
        elements // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE2, NESTED,
        ABSMAX2_DTYPE,
    )  # fmt: skip
    return code_values(elements, mask, packed_ptr, code_ptr) * scale
