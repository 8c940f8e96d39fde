"""Pure-PyTorch math of ``ops.nf4_lora_linear``: the oracle of the Triton kernels.

The 4-bit weight is decoded with this package's bit-exact ``reference.nf4_dequantize`` (in the state's dtype, then
cast to x's, as bitsandbytes' ``dequantize_4bit(...).to(x.dtype)``), and the dense reference math
(``reference.lora_linear.forward`` / ``backward``) runs on it. Backward decodes the weight again: nothing dense is
kept between the two. ``weight4`` is the op's ``Packed4bit``; its ``code`` table is not read (the reference has its
own tables).
"""

from __future__ import annotations

import torch

from lora_engine.reference import lora_linear as dense
from lora_engine.reference.nf4_dequantize import nf4_dequantize


def decoded_weight(weight4, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight of ``weight4`` in ``dtype`` (a new tensor)."""
    return nf4_dequantize(weight4.packed, weight4.quant_state).to(dtype)


def forward(x, weight4, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y [..., out], xa [..., r], keep_bits)`` as ``reference.lora_linear.forward`` returns them."""
    weight = decoded_weight(weight4, x.dtype)
    return dense.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, False)


def backward(grad_out, x, weight4, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, needs):
    """``(dx, dA, dB)``, each None unless ``needs`` asks for it; the weight is decoded only for dx."""
    weight = decoded_weight(weight4, x.dtype) if needs[0] else None
    return dense.backward(
        grad_out, x, weight, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, False, needs
    )
