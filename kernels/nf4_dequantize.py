"""Decode bitsandbytes' packed 4-bit weights (NF4/FP4, optionally double-quantized) in one Triton launch.

The format is described in ``reference/nf4_dequantize.py``. Each program decodes ``BLOCK`` consecutive elements of
the row-major flattened weight with ``nf4_decode.decode_4bit`` (the one decode every 4-bit kernel shares: the
element's nibble through the 16-entry table held in registers, times its block's absmax, decoded inline from the
8-bit nested absmax when the state is double-quantized, in fp32), rounded to nearest even into the weight's dtype
and, when the output buffer has another dtype (``nf4_lora_linear`` decodes into x's dtype, as bitsandbytes'
``dequantize_4bit(...).to(x.dtype)``), rounded again into that one.

Bit-exactness with ``bitsandbytes.functional.dequantize_4bit`` needs every product and sum rounded where bnb's
decode rounds it, so the launch passes ``enable_fp_fusion=False`` (see ``nf4_decode``).
"""

from __future__ import annotations

from math import prod

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, cast, on_device
from .nf4_decode import TRITON_DTYPES, absmax_operands, decode_4bit

__all__ = ["nf4_dequantize"]

BLOCK, NUM_WARPS = (256, 1) if INTERPRETED else (1024, 4)


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # [ceil(NUMEL / 2)] uint8
    code_ptr,  # [16] fp32
    absmax_ptr,  # [blocks] fp32, or uint8 when NESTED
    absmax2_ptr,  # [ceil(blocks / BLOCKSIZE2)] fp32 (NESTED only)
    code2_ptr,  # [256] fp32 (NESTED only)
    out_ptr,  # [NUMEL]: WEIGHT_DTYPE, or another float dtype it is rounded into
    NUMEL,
    offset,
    WEIGHT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX2_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = elements < NUMEL
    values = decode_4bit(
        elements, mask, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE, BLOCKSIZE2,
        NESTED, ABSMAX2_DTYPE,
    )  # fmt: skip
    weight = cast(values, WEIGHT_DTYPE)
    tl.store(out_ptr + elements, cast(weight, out_ptr.dtype.element_ty), mask=mask)


@torch.no_grad()
def nf4_dequantize(
    packed: torch.Tensor, quant_state, code: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``ops.nf4_dequantize`` in Triton; the op checks the operands (and ``out``) first.

    ``code``: the format's 16-entry fp32 code table on ``packed``'s device (``quant_state.code`` is not trusted:
    the op passes the fixed table of ``quant_state.quant_type``). Writes into ``out`` when given (contiguous,
    ``quant_state.shape``, on ``packed``'s device; ``quant_state.dtype`` for the op, or another float dtype the
    weight is then rounded into, for ``nf4_lora_linear``) and returns it; else into a new tensor.
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
            WEIGHT_DTYPE=TRITON_DTYPES[quant_state.dtype],
            BLOCKSIZE=quant_state.blocksize,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
            **absmax_operands(quant_state),
        )
    return out
