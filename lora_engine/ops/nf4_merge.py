"""The ``nf4_merge`` op: ``dequantize(W4) ± delta`` quantized again into bitsandbytes' 4-bit format, in one pass.

Contract::

    new_packed, new_absmax = nf4_merge(packed, quant_state, delta, subtract=False, check_finite=False)

- ``packed``, ``quant_state``: as ``nf4_dequantize`` reads them (NF4 or FP4, nested absmax or not).
- ``delta``: ``quant_state.shape`` fp32 on ``packed``'s device (``s · B A``, computed by the caller).
- Returns the new packed bytes (``[ceil(numel / 2)]`` uint8) and the new per-block fp32 absmax: bit for bit what
  ``bitsandbytes.functional.quantize_4bit(dequantize_4bit(packed, quant_state).float() ± delta)`` packs, with
  bnb's pure-PyTorch quantizer (the one its CPU backend runs), before any double quantization. Double quant is the
  caller's next step: ``quantize_blockwise(new_absmax - new_absmax.mean(), blocksize=256)``, as bnb does.
- ``check_finite``: raises ``FloatingPointError`` when any merged value is NaN/Inf; nothing is written either way
  (the results are new tensors), so a caller installs them only after this returns.

Nothing is mutated. No gradient. Triton only (``kernels/nf4_merge.py``): ``RuntimeError`` where the backend would
not run Triton on ``packed``'s device; the dense recipe above is the reference, and callers run it there. bnb's
CUDA quantizer rounds differently from its PyTorch one (it multiplies the partial last block by the reciprocal too,
does not clamp a zero absmax, and compares against literal thresholds), and no GPU has checked this kernel against
it, so ``LoraLinear4bit`` uses the op only off CUDA. Raises ``ValueError`` as ``nf4_dequantize`` does, or naming
``delta`` when its shape, dtype or device differ from the above.
"""

from __future__ import annotations

import functools

import torch

from lora_engine import backend
from lora_engine.ops.nf4_dequantize import check_operands as check_4bit_operands
from lora_engine.reference.nf4_dequantize import CODE_TABLES

OP = "nf4_merge"


@functools.cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(code, bounds, order)`` on ``device``: bnb's quantization midpoints between the sorted codes (computed
    as bnb computes them, in fp32), padded with +inf to 16, and the sorted position → code index map."""
    code = CODE_TABLES[quant_type]
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    bounds = torch.cat([midpoints, torch.tensor([float("inf")])])
    return code.to(device), bounds.to(device), order.to(torch.int32).to(device)


def nf4_merge(
    packed: torch.Tensor,
    quant_state,
    delta: torch.Tensor,
    *,
    subtract: bool = False,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    check_4bit_operands(packed, quant_state)
    shape = tuple(quant_state.shape)
    if tuple(delta.shape) != shape or delta.dtype != torch.float32 or delta.device != packed.device:
        raise ValueError(
            f"{OP}: delta is {tuple(delta.shape)} {delta.dtype} on {delta.device}; expected {shape} torch.float32 "
            f"on {packed.device}"
        )
    if not backend.uses_triton(OP, packed.device):
        raise RuntimeError(
            f"{OP} runs only as a Triton kernel; on {packed.device} with {backend.ENV_VAR}="
            f"{backend.get_backend()} merge by dequantize, add and quantize_4bit instead"
        )
    from lora_engine.kernels.nf4_merge import nf4_merge as triton_merge

    code, bounds, order = _tables(quant_state.quant_type, packed.device)
    new_packed, new_absmax, finite = triton_merge(
        packed, quant_state, delta.contiguous(), subtract, code, bounds, order
    )
    if check_finite and not finite:
        raise FloatingPointError(f"{OP}: the merged 4-bit weight would hold NaN or Inf")
    return new_packed, new_absmax
