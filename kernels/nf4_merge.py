"""Merge a dense delta into a bitsandbytes 4-bit weight in one Triton pass: decode, add, quantize again.

One program per 4-bit block. It decodes the block (``nf4_decode.decode_4bit``, nested absmax inline), rounds it
to the weight's dtype and back to fp32 (the recipe's ``dequantize_4bit(...).float()``), adds the fp32 delta, and
quantizes the sum with the rule of the bitsandbytes quantizer that the recipe would run on the weight's device
(``CUDA_RULE``), packing two indices per byte, high nibble first:

- the pure-PyTorch rule (bnb's ``default`` backend, which its CPU backend runs): ``absmax`` = max |x| over the
  block; a full block is scaled by ``x * (1 / max(absmax, 1e-38))``, the last, partial block by
  ``x / max(absmax, 1e-38)`` (bnb does the two differently), both clamped to [-1, 1]; the index is the number of
  code midpoints strictly below the scaled value (``torch.bucketize``), mapped through the sorted-to-code
  ``order`` (the identity for NF4);
- the CUDA rule (bnb's ``kQuantizeBlockwise``, built with ``--use_fast_math``; emulated and explained in
  ``reference/nf4_quantize.py``): subnormals flushed to zero; ``absmax`` = max |x|; every block, partial or not,
  scaled by ``x * r`` with ``r`` = MUFU.RCP(absmax) (``rcp.approx.ftz.f32``, the instruction nvcc emits for bnb's
  ``1.0f / absmax``; under the interpreter, which has no such instruction, the correctly rounded reciprocal), no
  clamp; the index is the number of bnb's literal thresholds strictly below the scaled value (NF4), or the sign
  bit plus the magnitude code of ``|x * r|`` (FP4). An all-zero block scales to NaN and takes index 0, as on the
  GPU.

The new bytes and fp32 absmax go to fresh buffers, and a flag records any non-finite sum, so that the caller can
refuse a bad merge (``safe_merge``) before anything of the layer is written. Re-compressing the absmax (double
quant) is left to the caller: it is bnb's ``quantize_blockwise`` on ``absmax - absmax.mean()``.
"""

from __future__ import annotations

from math import prod

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, cast, on_device
from .nf4_decode import TRITON_DTYPES, absmax_operands, decode_4bit

__all__ = ["nf4_merge"]

# The CUDA rule's reciprocal: the GPU's MUFU.RCP when compiled, the correctly rounded one under the interpreter.
HARDWARE_RECIPROCAL = tl.constexpr(not INTERPRETED)


def num_warps(blocksize: int) -> int:
    """Warps per program (one 4-bit block): enough that a 4096-element block does not spill registers on an
    H100 (4 warps do, for the 16-way midpoint compare); one under the interpreter."""
    return 1 if INTERPRETED else min(16, max(4, blocksize // 256))


@triton.jit
def _merged(
    elements,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    delta_ptr,
    NUMEL,
    offset,
    SIGN,
    WEIGHT_DTYPE: tl.constexpr,
    BLOCKSIZE,
    BLOCKSIZE2,
    NESTED: tl.constexpr,
    ABSMAX2_DTYPE: tl.constexpr,
):
    """fp32 ``decode(elements).to(WEIGHT_DTYPE).float() + SIGN * delta``; 0 past ``NUMEL`` (bnb's padding)."""
    in_range = elements < NUMEL
    values = decode_4bit(
        elements, in_range, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, BLOCKSIZE,
        BLOCKSIZE2, NESTED, ABSMAX2_DTYPE,
    )  # fmt: skip
    weight = cast(values, WEIGHT_DTYPE).to(tl.float32)
    delta = tl.load(delta_ptr + elements, mask=in_range, other=0.0)
    return tl.where(in_range, weight + SIGN * delta, 0.0)


@triton.jit
def _quantized(x, absmax, partial, bounds, order):
    """bnb's pure-PyTorch 4-bit index of ``x`` in a block of ``absmax`` (see the module docstring)."""
    clamped = tl.maximum(absmax, 1e-38)
    scaled = tl.where(partial, tl.math.div_rn(x, clamped), x * tl.math.div_rn(1.0, clamped))
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    position = tl.sum((bounds[None, :] < scaled[:, None]).to(tl.int32), 1)
    return tl.gather(order, position, 0)


@triton.jit
def _flushed(x):
    """``x`` with fp32 subnormals set to 0, as the GPU's ``.FTZ`` instructions in bnb's CUDA build read them."""
    return tl.where(tl.abs(x) < 1.1754943508222875e-38, 0.0, x)


@triton.jit
def _reciprocal(absmax):
    """bnb's CUDA ``1.0f / absmax`` under ``--use_fast_math``: MUFU.RCP, flushing a subnormal result to 0."""
    if HARDWARE_RECIPROCAL:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [absmax], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return _flushed(tl.math.div_rn(1.0, absmax))


@triton.jit
def _quantized_as_cuda(x, reciprocal, thresholds, codes, SIGN_BIT: tl.constexpr):
    """bnb's CUDA 4-bit index of the flushed ``x`` in a block whose reciprocal absmax is ``reciprocal``: the count
    of ``thresholds`` below ``x * reciprocal`` (NF4), or with ``SIGN_BIT`` (FP4) the ``codes`` entry of the count
    below its magnitude plus 8 for a negative value. NaN (an all-zero block) compares false: index 0."""
    scaled = _flushed(x * reciprocal)
    if SIGN_BIT:
        position = tl.sum((thresholds[None, :] < tl.abs(scaled)[:, None]).to(tl.int32), 1)
        return tl.gather(codes, position, 0) | tl.where(scaled < 0, 8, 0)
    else:
        return tl.sum((thresholds[None, :] < scaled[:, None]).to(tl.int32), 1)


@triton.jit
def _not_finite(x):
    # NaN fails `<` as well, so this counts NaN and ±Inf alike.
    return tl.sum(((tl.abs(x) < float("inf")) == 0).to(tl.int32))


@triton.jit
def _merge_kernel(
    packed_ptr,  # [ceil(NUMEL / 2)] uint8, read
    code_ptr,  # [16] fp32
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    delta_ptr,  # [NUMEL] fp32, added (or subtracted with SIGN = -1)
    bounds_ptr,  # [16] fp32: torch rule, the 15 sorted code midpoints; CUDA rule, bnb's thresholds; then +inf
    order_ptr,  # [16] int32: torch rule, sorted position → code index; CUDA rule, FP4's magnitude codes
    new_packed_ptr,  # [ceil(NUMEL / 2)] uint8, written
    new_absmax_ptr,  # [blocks] fp32, written
    flag_ptr,  # [1] int32: set to 1 when a sum is not finite
    NUMEL,
    offset,
    SIGN: tl.constexpr,
    WEIGHT_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX2_DTYPE: tl.constexpr,
    CUDA_RULE: tl.constexpr,
    SIGN_BIT: tl.constexpr,
):
    block = tl.program_id(0)
    pairs = block.to(tl.int64) * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)  # one byte each
    high = _merged(
        2 * pairs, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, delta_ptr, NUMEL, offset, SIGN,
        WEIGHT_DTYPE, BLOCKSIZE, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE,
    )  # fmt: skip
    low = _merged(
        2 * pairs + 1, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, delta_ptr, NUMEL, offset, SIGN,
        WEIGHT_DTYPE, BLOCKSIZE, BLOCKSIZE2, NESTED, ABSMAX2_DTYPE,
    )  # fmt: skip
    # Every program that sees a bad value writes the same 1: a benign race, no atomic needed.
    tl.store(flag_ptr, 1, mask=_not_finite(high) + _not_finite(low) > 0)

    bounds = tl.load(bounds_ptr + tl.arange(0, 16))
    order = tl.load(order_ptr + tl.arange(0, 16))
    if CUDA_RULE:
        high, low = _flushed(high), _flushed(low)
        absmax = tl.maximum(tl.max(tl.abs(high), 0), tl.max(tl.abs(low), 0))
        reciprocal = _reciprocal(absmax)
        byte = (_quantized_as_cuda(high, reciprocal, bounds, order, SIGN_BIT) << 4) | _quantized_as_cuda(
            low, reciprocal, bounds, order, SIGN_BIT
        )
    else:
        absmax = tl.maximum(tl.max(tl.abs(high), 0), tl.max(tl.abs(low), 0))
        partial = (block + 1).to(tl.int64) * BLOCKSIZE > NUMEL  # bnb divides in the last, partial block
        byte = (_quantized(high, absmax, partial, bounds, order) << 4) | _quantized(
            low, absmax, partial, bounds, order
        )
    tl.store(new_absmax_ptr + block, absmax)
    tl.store(new_packed_ptr + pairs, byte.to(tl.uint8), mask=2 * pairs < NUMEL)


@torch.no_grad()
def nf4_merge(
    packed: torch.Tensor,
    quant_state,
    delta: torch.Tensor,
    subtract: bool,
    code: torch.Tensor,
    bounds: torch.Tensor,
    order: torch.Tensor,
    cuda_rule: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(new packed bytes [ceil(numel / 2)] uint8, new absmax [blocks] fp32, all sums finite)`` of
    ``dequantize(packed) ± delta`` quantized again; see ``ops.nf4_merge`` for the contract (it checks operands).

    ``delta``: contiguous fp32 of ``quant_state.shape``; ``code``, ``bounds`` ([16] fp32) and ``order`` ([16]
    int32) as the op builds them for the rule (``cuda_rule``: bnb's CUDA quantizer, else its pure-PyTorch one).
    Nothing is mutated.
    """
    numel = prod(quant_state.shape)
    blocks = triton.cdiv(numel, quant_state.blocksize)
    new_packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=packed.device)
    new_absmax = torch.empty(blocks, dtype=torch.float32, device=packed.device)
    flag = torch.zeros(1, dtype=torch.int32, device=packed.device)
    with on_device(packed):
        _merge_kernel[(blocks,)](
            packed.reshape(-1).view(torch.uint8), code, delta_ptr=delta, bounds_ptr=bounds, order_ptr=order,
            new_packed_ptr=new_packed, new_absmax_ptr=new_absmax, flag_ptr=flag, NUMEL=numel,
            SIGN=-1.0 if subtract else 1.0, WEIGHT_DTYPE=TRITON_DTYPES[quant_state.dtype],
            BLOCKSIZE=quant_state.blocksize, CUDA_RULE=cuda_rule,
            SIGN_BIT=cuda_rule and quant_state.quant_type == "fp4", num_warps=num_warps(quant_state.blocksize),
            enable_fp_fusion=False, **absmax_operands(quant_state),
        )  # fmt: skip
    return new_packed, new_absmax, not flag.item()
