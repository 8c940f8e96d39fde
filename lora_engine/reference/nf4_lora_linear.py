"""PyTorch math of ``ops.nf4_lora_linear``: the oracle of the Triton kernels and the CPU's 4-bit LoRA layer in
training.

The 4-bit weight is decoded with this package's bit-exact ``reference.nf4_dequantize`` (in the state's dtype, then
cast to x's, as bitsandbytes' ``dequantize_4bit(...).to(x.dtype)``) and used for one GEMM; backward decodes it
again: nothing dense is kept between the two. ``weight4`` is the op's ``Packed4bit``; its ``code`` table is not
read (the reference has its own tables).

Why not the dense reference (``reference.lora_linear``) on the decoded weight: that math scales and adds
``[N, out]`` and ``[N, in]`` tensors (``dy · s``, ``base + delta``, ``dx_base + dx_lora``). Here every full-size
sum is the ``beta = 1`` of a GEMM (``addmm_`` into the base product; ``dx`` as the dense reference's
``input_grad`` forms it) and ``s`` and ``1 / (1 - p)`` are applied to ``[N, r]`` or ``[out, r]`` products only, so a
training step reads and writes no full-size tensor beyond its two weight GEMMs' operands and results. The two
weight GEMMs are ``cpu_linear``'s (oneDNN for fp32 on the CPU: 0.66x peft's time for a 128-row 512 × 512 layer's
forward + backward, against 0.94x with MKL). Same sums, other rounding order: within fp32 tolerance of the dense
math.
The dropout mask is the dense reference's (``keep_mask``/``pack_keep``), drawn in forward and saved bit-packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_engine.reference import cpu_linear
from lora_engine.reference import lora_linear as dense
from lora_engine.reference.nf4_dequantize import nf4_dequantize


def decoded_weight(weight4, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight of ``weight4`` in ``dtype`` (a new tensor)."""
    return nf4_dequantize(weight4.packed, weight4.quant_state).to(dtype)


def _add_product_(into: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> torch.Tensor:
    """``into += alpha · left @ right`` (2-D operands), in place: in the GEMM itself where the dtypes agree,
    else computed in ``left``'s dtype and added with torch's promotion, rounded once to ``into``'s dtype."""
    if into.dtype == left.dtype == right.dtype:
        return into.addmm_(left, right, alpha=alpha)
    product = left @ right
    if alpha != 1.0:
        product *= alpha
    return into.add_(product)


def forward(x, weight4, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y [..., out], xa [N, r], keep_bits)``: the output in x's dtype, ``drop(x) Aᵀ`` (rescaled by
    ``1 / (1 - p)``) in the adapters' dtype over x's rows flattened, and the packed keep-mask (``[N, ceil(in/8)]``
    uint8, drawn from ``seed``) when ``dropout_p > 0``, else None; ``backward`` takes the last two back."""
    in_features, rank = x.shape[-1], lora_A.shape[0]
    x_rows = x.reshape(-1, in_features)
    x_lora = x_rows.to(lora_A.dtype)
    bits = None
    if dropout_p > 0.0:
        keep = dense.keep_mask(seed, x_rows.shape[0], in_features, dropout_p)
        bits = dense.pack_keep(keep)
        # A uint8 0/1 factor: torch's CPU kernels promote it inside their vector loop (a bool costs ~4x more).
        x_lora_A = F.linear(x_lora * keep.view(torch.uint8), lora_A)
        x_lora_A *= 1.0 / (1.0 - dropout_p)
        del keep
    else:
        x_lora_A = F.linear(x_lora, lora_A)
    out = cpu_linear.linear(x_rows, decoded_weight(weight4, x.dtype), bias)
    _add_product_(out, x_lora_A, lora_B.T, scaling)
    return out.view(*x.shape[:-1], out.shape[-1]), x_lora_A.view(-1, rank), bits


def backward(grad_out, x, weight4, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, needs):
    """``(dx, dA, dB)`` for ``dy = grad_out [..., out]``, each None unless ``needs`` (three bools) asks for it;
    ``dx`` in x's dtype (the weight decoded again, only for it), ``dA``/``dB`` in the adapters'."""
    need_x, need_A, need_B = needs
    in_features = x.shape[-1]
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_lora = grad_rows.to(lora_B.dtype)
    grad_x = grad_A = grad_B = None
    if need_B:
        grad_B = grad_lora.T @ xa
        grad_B *= scaling
    # d(drop(x) Aᵀ) = s · dy B, times 1 / (1 - p) under dropout: both on [N, r].
    grad_xa = grad_lora @ lora_B
    grad_xa *= scaling / (1.0 - dropout_p) if keep_bits is not None else scaling
    keep = None
    if keep_bits is not None:
        keep = dense.unpack_keep(keep_bits, in_features).view(torch.uint8)
    if need_A:
        x_lora = x.reshape(-1, in_features).to(lora_A.dtype)
        grad_A = grad_xa.T @ (x_lora if keep is None else x_lora * keep)
    if need_x:
        weight = decoded_weight(weight4, x.dtype)
        grad_x = dense.input_grad(grad_rows, weight, grad_xa, lora_A, keep).view(x.shape)
    return grad_x, grad_A, grad_B
