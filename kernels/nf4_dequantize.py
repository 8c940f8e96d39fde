"""Decode bitsandbytes' packed 4-bit weights (NF4/FP4, optionally double-quantized) in one Triton launch.

The format is described in ``reference/nf4_dequantize.py``. Each program decodes ``BLOCK`` consecutive elements of
the row-major flattened weight: the element's byte (high nibble first), its code through the 16-entry table held
in registers (``tl.gather``), its block's absmax — decoded inline from the 8-bit nested absmax when the state is
double-quantized — and one fp32 product, rounded to nearest even into the output dtype.

Bit-exactness with ``bitsandbytes.functional.dequantize_4bit`` needs every product and sum rounded where bnb's
decode rounds it: the nested absmax is ``code2[q] * absmax2`` rounded, then ``+ offset`` rounded. The launch
therefore passes ``enable_fp_fusion=False`` so the compiler cannot contract that multiply-add into an FMA (which
would round once); the interpreter never fuses.

Imported by ``kernels/nf4_merge.py`` for the same decode.
"""

from __future__ import annotations

from math import prod

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, cast, on_device

__all__ = ["nf4_dequantize", "absmax_operands"]

BLOCK, NUM_WARPS = (256, 1) if INTERPRETED else (1024, 4)

TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def absmax_operands(quant_state) -> dict:
    """The kernel arguments that describe a ``QuantState``'s block scales, plain or nested.

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


@triton.jit
def block_scale(block, absmax_ptr, absmax2_ptr, code2_ptr, offset, mask, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE):
    """The fp32 absmax of 4-bit blocks ``block``, decoding the nested absmax when ``NESTED``:
    ``((code2[q] * absmax2[block // BLOCKSIZE2]) → ABSMAX2_DTYPE) + offset → ABSMAX2_DTYPE → fp32``, as bnb."""
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
def code_values(packed_ptr, code_ptr, elements, mask):
    """fp32 ``code[index]`` of the flat element indices ``elements`` (int64) of a packed 4-bit weight."""
    packed = tl.load(packed_ptr + elements // 2, mask=mask, other=0).to(tl.int32)
    index = (packed >> (4 - 4 * (elements % 2)).to(tl.int32)) & 0xF
    # The 16-entry table in registers: a gather, not a load per element.
    table = tl.load(code_ptr + tl.arange(0, 16))
    return tl.gather(table, index, 0)


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # [ceil(NUMEL / 2)] uint8
    code_ptr,  # [16] fp32
    absmax_ptr,  # [blocks] fp32, or uint8 when NESTED
    absmax2_ptr,  # [ceil(blocks / BLOCKSIZE2)] fp32 (NESTED only)
    code2_ptr,  # [256] fp32 (NESTED only)
    out_ptr,  # [NUMEL] OUT_DTYPE
    NUMEL,
    offset,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX2_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = elements < NUMEL
    values = code_values(packed_ptr, code_ptr, elements, mask)
    scale = block_scale(
        elements // BLOCKSIZE,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset,
        mask,
        BLOCKSIZE2,
        NESTED,
        ABSMAX2_DTYPE,
    )
    tl.store(out_ptr + elements, cast(values * scale, out_ptr.dtype.element_ty), mask=mask)


@torch.no_grad()
def nf4_dequantize(
    packed: torch.Tensor, quant_state, code: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``ops.nf4_dequantize`` in Triton; the op checks the operands (and ``out``) first.

    ``code``: the format's 16-entry fp32 code table on ``packed``'s device (``quant_state.code`` is not trusted:
    the op passes the fixed table of ``quant_state.quant_type``). Writes into ``out`` when given (contiguous, ``quant_state.shape`` and ``.dtype``, on ``packed``'s device) and
    returns it; else into a new tensor.
    """
    shape = tuple(quant_state.shape)
    if out is None:
        out = torch.empty(shape, dtype=quant_state.dtype, device=packed.device)
    numel = prod(shape)
    if numel == 0:
        return out
    with on_device(packed):
        _dequantize_kernel[(triton.cdiv(numel, BLOCK),)](
            packed.reshape(-1).view(torch.uint8),
            code,
            out_ptr=out,
            NUMEL=numel,
            BLOCKSIZE=quant_state.blocksize,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
            **absmax_operands(quant_state),
        )
    return out
