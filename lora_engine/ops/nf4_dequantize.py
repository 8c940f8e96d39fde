"""The ``nf4_dequantize`` op: bitsandbytes' packed 4-bit weight (NF4 or FP4) → the dense weight.

Contract::

    W = nf4_dequantize(packed, quant_state, out=None)   # bit-exact with bitsandbytes.functional.dequantize_4bit

- ``packed``: a ``Params4bit``'s ``.data``: two 4-bit code indices per byte, high nibble first, usually
  ``[ceil(numel / 2), 1]`` uint8; another ``quant_storage`` dtype (bf16, fp32, ...) is read as its bytes.
  Any device; the result is on the same one.
- ``quant_state``: its ``bitsandbytes.functional.QuantState``. Read: ``quant_type`` (``"nf4"`` or ``"fp4"``),
  ``blocksize``, ``absmax`` (fp32, one per block of ``blocksize`` consecutive elements of the row-major
  flattened weight; blocks cross rows), ``shape``, ``dtype``; when ``nested`` (double quant), ``absmax`` is
  uint8 and is decoded with ``state2`` (``absmax``, ``code``, ``blocksize``, ``dtype``) plus ``offset``.
  ``quant_state.code`` is not read: the NF4 and FP4 tables are fixed by the format.
- ``out`` (optional): a contiguous tensor of ``quant_state.shape`` and ``quant_state.dtype`` on ``packed``'s
  device, overwritten and returned. For a scratch buffer reused across layers and steps (training decodes each
  frozen weight again in every forward and backward): the caller owns it, and a result read after the next call
  into the same buffer is that call's weight. ``None``: a new tensor.
- Returns a tensor of shape ``quant_state.shape`` and dtype ``quant_state.dtype`` (fp32, fp16 or bf16).
  Each element is ``code[index] * absmax[block]`` computed in fp32, then rounded to nearest-even.

Only ``out`` is mutated. No gradient flows (the 4-bit weight is frozen). Raises ``ValueError`` for an unknown
``quant_type``, when ``packed`` or ``absmax`` holds fewer entries than ``quant_state.shape`` needs, or when ``out``
does not fit the above. On CUDA (or ``LORA_ENGINE_BACKEND=triton``) one Triton launch decodes everything, the
nested absmax included (``kernels/nf4_dequantize.py``); bit-exact with the reference below.

Where bitsandbytes' own decodes disagree with one another, this op follows the format and bnb's pure-PyTorch
decode (``bitsandbytes/backends/default/ops.py``), which it matches bit for bit:

- FP4 index 8 (sign bit set, zero) is +0.0, as in bnb's table; bnb's CUDA kernel and scalar C++ loop give
  -0.0. Equal in value, so ``torch.equal`` with any bnb decode holds.
- bnb's ``dequantize_4bit`` returns the result transposed when ``packed.shape[0] == 1`` (a shim for an old
  layout: a 2-element weight, or 8 elements in fp32 storage); this op always returns ``quant_state.shape``.
- bnb 0.50's AVX-512 CPU kernel (taken when the last dim is a multiple of 16 and ``blocksize < 2048``) reads
  ``absmax[row * (cols // blocksize) + col // blocksize]``, the element's block only when
  ``cols % blocksize == 0``; for other widths (e.g. ``cols=64``, ``blocksize=128``) its output is wrong.
- On CPUs with AVX512-BF16 that same kernel flushes subnormal bf16 results to zero (``VCVTNEPS2BF16``); this op
  keeps them. It matters only for blocks whose absmax is below ~1e-36.
"""

from __future__ import annotations

import functools
from math import prod

import torch

from lora_engine import backend
from lora_engine.reference import nf4_dequantize as reference


def check_operands(packed: torch.Tensor, quant_state) -> None:
    """The contract of the module docstring on ``quant_type`` and sizes; raises what it says."""
    if quant_state.quant_type not in reference.CODE_TABLES:
        raise ValueError(
            f"nf4_dequantize: quant_type {quant_state.quant_type!r} is not a 4-bit type; expected 'nf4' or 'fp4'"
        )
    numel = prod(quant_state.shape)
    packed_bytes = packed.numel() * packed.element_size()
    if packed_bytes * 2 < numel:
        raise ValueError(
            f"nf4_dequantize: packed holds {packed_bytes} bytes ({tuple(packed.shape)} {packed.dtype}), "
            f"but quant_state.shape {tuple(quant_state.shape)} needs {(numel + 1) // 2}"
        )
    blocks = -(-numel // quant_state.blocksize)
    if quant_state.absmax.numel() < blocks:
        raise ValueError(
            f"nf4_dequantize: absmax has {quant_state.absmax.numel()} entries, but shape "
            f"{tuple(quant_state.shape)} with blocksize {quant_state.blocksize} needs {blocks}"
        )


def check_out(out: torch.Tensor, packed: torch.Tensor, quant_state) -> None:
    """``out`` as the module docstring requires; raises ``ValueError`` naming what differs."""
    expected = (tuple(quant_state.shape), quant_state.dtype, packed.device)
    if (tuple(out.shape), out.dtype, out.device) != expected or not out.is_contiguous():
        raise ValueError(
            f"nf4_dequantize: out is {tuple(out.shape)} {out.dtype} on {out.device}"
            f"{'' if out.is_contiguous() else ', not contiguous'}; expected a contiguous {expected[0]} "
            f"{expected[1]} on {expected[2]}"
        )


@functools.cache
def code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The format's code table on ``device``, copied there once."""
    return reference.CODE_TABLES[quant_type].to(device)


@torch.no_grad()
def nf4_dequantize(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed 4-bit ``packed`` + ``quant_state`` → ``quant_state.shape`` in ``quant_state.dtype`` (into ``out``
    when given); see the module docstring."""
    check_operands(packed, quant_state)
    if out is not None:
        check_out(out, packed, quant_state)
    if backend.uses_triton("nf4_dequantize", packed.device):
        from lora_engine.kernels.nf4_dequantize import nf4_dequantize as triton_dequantize

        code = code_on(quant_state.quant_type, packed.device)
        return triton_dequantize(packed, quant_state, code, out)
    weight = reference.nf4_dequantize(packed, quant_state)
    return weight if out is None else out.copy_(weight)
