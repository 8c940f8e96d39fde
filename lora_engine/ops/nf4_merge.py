"""The ``nf4_merge`` op: ``dequantize(W4) ± delta`` quantized again into bitsandbytes' 4-bit format, in one pass.

Contract::

    new_packed, new_absmax = nf4_merge(packed, quant_state, delta, subtract=False, check_finite=False, rule=None)

- ``packed``, ``quant_state``: as ``nf4_dequantize`` reads them (NF4 or FP4, nested absmax or not).
- ``delta``: ``quant_state.shape`` fp32 on ``packed``'s device (``s · B A``, computed by the caller).
- Returns the new packed bytes (``[ceil(numel / 2)]`` uint8) and the new per-block fp32 absmax: bit for bit what
  ``bitsandbytes.functional.quantize_4bit(dequantize_4bit(packed, quant_state).float() ± delta)`` packs on
  ``packed``'s device, before any double quantization, for finite sums. Double quant is the caller's next step:
  ``quantize_blockwise(new_absmax - new_absmax.mean(), blocksize=256)`` on the same device, as bnb does.
- ``rule``: whose rounding to reproduce. bnb quantizes differently by device: ``"cuda"`` is its CUDA kernel
  (literal thresholds, a hardware reciprocal, subnormals flushed; ``reference/nf4_quantize.py`` emulates it),
  ``"torch"`` its pure-PyTorch quantizer, which its CPU backend runs. ``None`` (the default) takes the one of
  ``packed``'s device, which is what the recipe would run there. On a GPU the CUDA rule uses the same reciprocal
  instruction as bnb; under the interpreter the correctly rounded one (see ``kernels/nf4_merge.py``). The CUDA
  rule is read from bnb 0.50's kernels.cu and SASS and tested here against its emulation; the CUDA-only tests
  of ``tests/kernel_ops/test_nf4_merge_cuda_rule.py`` compare it with bnb's own kernel on a GPU.
- ``check_finite``: raises ``FloatingPointError`` when any merged value is NaN/Inf; nothing is written either way
  (the results are new tensors), so a caller installs them only after this returns.

Nothing is mutated. No gradient. Triton only (``kernels/nf4_merge.py``): ``RuntimeError`` where the backend would
not run Triton on ``packed``'s device; the dense recipe above is the reference, and callers run it there. Raises
``ValueError`` as ``nf4_dequantize`` does, naming ``delta`` when its shape, dtype or device differ from the above,
or naming ``rule`` when it is not one of the above.
"""

from __future__ import annotations

import functools

import torch

from lora_engine import backend
from lora_engine.ops.nf4_dequantize import check_operands as check_4bit_operands
from lora_engine.reference.nf4_dequantize import CODE_TABLES
from lora_engine.reference.nf4_quantize import FP4_MAGNITUDE_CODES, FP4_THRESHOLDS, NF4_THRESHOLDS

OP = "nf4_merge"
RULES = ("cuda", "torch")


def _padded(values: torch.Tensor, fill) -> torch.Tensor:
    return torch.cat([values, torch.full((16 - len(values),), fill, dtype=values.dtype)])


@functools.cache
def _tables(
    quant_type: str, rule: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(code, bounds, order)`` on ``device``, 16 entries each (bounds padded with +inf, which nothing exceeds).

    Torch rule: bnb's quantization midpoints between the sorted codes (computed as bnb computes them, in fp32)
    and the sorted position → code index map. CUDA rule: bnb's literal thresholds (NF4's are the index itself;
    FP4's are on the magnitude) and FP4's magnitude codes (identity for NF4, unused).
    """
    code = CODE_TABLES[quant_type]
    if rule == "cuda":
        thresholds = NF4_THRESHOLDS if quant_type == "nf4" else FP4_THRESHOLDS
        order = FP4_MAGNITUDE_CODES if quant_type == "fp4" else torch.arange(16, dtype=torch.int32)
        bounds, order = _padded(thresholds, float("inf")), _padded(order, 0)
    else:
        order = torch.argsort(code)
        bounds = _padded((code[order[:-1]] + code[order[1:]]) / 2, float("inf"))
    return code.to(device), bounds.to(device), order.to(torch.int32).to(device)


def nf4_merge(
    packed: torch.Tensor,
    quant_state,
    delta: torch.Tensor,
    *,
    subtract: bool = False,
    check_finite: bool = False,
    rule: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    check_4bit_operands(packed, quant_state)
    if rule is None:
        rule = "cuda" if packed.device.type == "cuda" else "torch"
    if rule not in RULES:
        raise ValueError(f"{OP}: rule is {rule!r}; expected one of {RULES} (or None for packed's device)")
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

    code, bounds, order = _tables(quant_state.quant_type, rule, packed.device)
    new_packed, new_absmax, finite = triton_merge(
        packed, quant_state, delta.contiguous(), subtract, code, bounds, order, cuda_rule=rule == "cuda"
    )
    if check_finite and not finite:
        raise FloatingPointError(f"{OP}: the merged 4-bit weight would hold NaN or Inf")
    return new_packed, new_absmax
