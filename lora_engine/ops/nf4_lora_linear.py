"""The ``nf4_lora_linear`` op: a frozen bitsandbytes 4-bit linear layer plus one LoRA adapter, in one call.

Contract::

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,   W = dequantize_4bit(packed, quant_state).to(x.dtype)

- ``x``: ``[..., in]``, any leading dims and strides; fp32, fp16 or bf16 (the reference also takes float64): the
  dtype the base computes in (the 4-bit layer's ``compute_dtype``).
- ``packed``, ``quant_state``: a bitsandbytes ``Params4bit``'s ``.data`` and ``QuantState`` (NF4 or FP4, with or
  without double quant, any blocksize), in bnb's portable layout, as ``ops.nf4_dequantize`` reads them;
  ``quant_state.shape`` is ``(out, in)`` and ``quant_state.dtype`` one of fp32, fp16, bf16. W is decoded as
  ``nf4_dequantize`` decodes it, rounded to ``quant_state.dtype``, then cast to x's dtype, as bitsandbytes'
  ``matmul_4bit`` does.
- ``bias``: ``[out]`` in x's dtype, or ``None``. ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``, one dtype (the
  low-rank term is computed in it and the sum returned in x's dtype). All on one device.
- ``scaling``, ``dropout_p``: as for ``ops.lora_linear``; the dropout mask is that op's (the same hash of a seed
  drawn on x's device, saved bit-packed); pass ``dropout_p = 0`` in eval.

Gradients flow to ``x``, ``lora_A``, ``lora_B`` and ``bias`` (if it requires grad); never to the 4-bit weight
(first order only). Nothing is mutated, except that the Triton backend decodes W into a scratch buffer it owns
(``kernels.nf4_lora_linear``). Saved for backward: x as it came, ``drop(x) Aᵀ`` ``[..., r]`` and the packed
mask; never a dense W: backward decodes it again, and only when dx is needed.

Under ``torch.autocast`` every floating operand is first cast to the autocast dtype, as for ``ops.lora_linear``.
Not a custom op: under ``torch.compile`` the 4-bit layer keeps bitsandbytes' matmul (``layers/bnb.py``).

Raises ``ValueError`` naming the operand and its shape when the shapes do not chain, the devices when they differ,
and what ``ops.nf4_dequantize`` raises for a bad ``packed``/``quant_state``; ``TypeError`` naming the operand and
its dtype when a dtype is not one the backend computes in or two that must match do not.

Dispatch: ``backend.uses_triton`` (CUDA by default, or ``LORA_ENGINE_BACKEND=triton``) → ``kernels.nf4_lora_linear``
(a fused dequantize-in-GEMV for ≤ 64 rows, decode into a buffer + the dense kernels above); otherwise
``reference.nf4_lora_linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_engine import backend
from lora_engine.ops import nf4_dequantize as dequantize_op
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.ops.lora_linear import REFERENCE_DTYPES, TRITON_DTYPES, draw_seed
from lora_engine.reference import nf4_lora_linear as reference

__all__ = ["Nf4LoraLinearFunction", "Packed4bit", "check_operands", "nf4_lora_linear"]

OP = "nf4_lora_linear"
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Packed4bit(NamedTuple):
    """A 4-bit weight as the backends take it: bitsandbytes' packed bytes, its ``QuantState``, and the format's
    16-entry fp32 code table on the bytes' device (the fixed table of ``quant_state.quant_type``)."""

    packed: torch.Tensor
    quant_state: object
    code: torch.Tensor


def check_operands(x, packed, quant_state, bias, lora_A, lora_B, dtypes: tuple[torch.dtype, ...]) -> None:
    """The contract of the module docstring, for a backend that computes in ``dtypes``; raises what it says."""
    dequantize_op.check_operands(packed, quant_state)
    check_same_device(
        OP,
        {
            "x": x,
            "packed": packed,
            "absmax": quant_state.absmax,
            "bias": bias,
            "lora_A": lora_A,
            "lora_B": lora_B,
        },
    )
    names = ", ".join(str(dtype) for dtype in dtypes)
    if x.dtype not in dtypes:
        raise TypeError(f"{OP}: x has dtype {x.dtype}; expected one of {names}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{OP}: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share one dtype")
    if lora_A.dtype not in dtypes:
        raise TypeError(f"{OP}: lora_A and lora_B have dtype {lora_A.dtype}; expected one of {names}")
    if quant_state.dtype not in WEIGHT_DTYPES:
        raise TypeError(
            f"{OP}: quant_state.dtype is {quant_state.dtype}; expected one of "
            + ", ".join(str(dtype) for dtype in WEIGHT_DTYPES)
        )
    check_dims(OP, "lora_A", lora_A, 2, "[r, in]")
    check_dims(OP, "lora_B", lora_B, 2, "[out, r]")
    weight_shape = tuple(quant_state.shape)
    if len(weight_shape) != 2:
        raise ValueError(f"{OP}: quant_state.shape is {weight_shape}; expected (out, in)")
    out_features, in_features = weight_shape
    rank = lora_A.shape[0]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{OP}: x has shape {tuple(x.shape)}; expected [..., {in_features}] (quant_state.shape {weight_shape})"
        )
    if tuple(lora_A.shape) != (rank, in_features) or tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"{OP}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit the weight "
            f"{weight_shape}; expected [r, {in_features}] and [{out_features}, r]"
        )
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)}; expected ({out_features},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"{OP}: bias has dtype {bias.dtype} but x has {x.dtype}")


class Nf4LoraLinearFunction(torch.autograd.Function):
    """Autograd of ``nf4_lora_linear`` on one backend's math (``reference.nf4_lora_linear`` or
    ``kernels.nf4_lora_linear``). Saves x, ``drop(x) Aᵀ`` and the packed mask; the 4-bit weight is held by
    reference (it is the frozen parameter itself), never decoded into a saved tensor. First order only."""

    @staticmethod
    def forward(ctx, math, x, weight4, bias, lora_A, lora_B, scaling, dropout_p, seed):
        out, xa, keep_bits = math.forward(x, weight4, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, lora_A, lora_B, xa, keep_bits)
        ctx.math, ctx.weight4 = math, weight4
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, lora_A, lora_B, xa, keep_bits = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[1:6]
        grad_x, grad_A, grad_B = ctx.math.backward(
            grad_out, x, ctx.weight4, lora_A, lora_B, xa, keep_bits, ctx.scaling, ctx.dropout_p,
            (need_x, need_A, need_B),
        )  # fmt: skip
        grad_bias = None
        if need_bias:
            grad_bias = (
                grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
            )
        return None, grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def _autocast(operands):
    """Every floating operand cast to the autocast dtype (differentiably), as autocast casts ``F.linear``'s."""
    device_type = operands[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return operands
    autocast_dtype = torch.get_autocast_dtype(device_type)
    return tuple(operand.to(autocast_dtype) if operand is not None else None for operand in operands)


def _math(use_triton: bool):
    if not use_triton:
        return reference
    # Imported here: the kernel modules need triton, and triton fixes compiled-vs-interpreted at import.
    from lora_engine.kernels import nf4_lora_linear as kernel

    return kernel


def nf4_lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``[..., in]`` → ``[..., out]`` in x's dtype (the autocast dtype under autocast); see the module docstring."""
    use_triton = backend.uses_triton(OP, x.device)
    x, bias, lora_A, lora_B = _autocast((x, bias, lora_A, lora_B))
    check_operands(
        x, packed, quant_state, bias, lora_A, lora_B, TRITON_DTYPES if use_triton else REFERENCE_DTYPES
    )
    weight4 = Packed4bit(packed, quant_state, dequantize_op.code_on(quant_state.quant_type, packed.device))
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    return Nf4LoraLinearFunction.apply(
        _math(use_triton), x, weight4, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed
    )
