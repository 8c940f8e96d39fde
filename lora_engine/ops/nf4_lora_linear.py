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

Under ``torch.compile`` the op is the custom op pair ``lora_engine::nf4_lora_linear_forward`` / ``_backward``
(``torch.library.custom_op``, with fake implementations and registered autograd), so a compiled 4-bit LoRA layer
holds it as one node and never traces into bitsandbytes. A ``QuantState`` is no custom-op argument, so it is passed
as its tensors (``absmax``, and with double quant ``state2.absmax``, ``state2.code``, ``offset``) and its static
metadata (``shape``, ``blocksize``, ``quant_type``, ``dtype``, and ``state2.blocksize`` / ``state2.dtype``), and
rebuilt inside (``_Quantized``). Eager calls take the equivalent ``Nf4LoraLinearFunction`` directly, which skips
the dispatcher's per-call overhead (as ``ops.lora_linear`` does).

Raises ``ValueError`` naming the operand and its shape when the shapes do not chain, the devices when they differ,
and what ``ops.nf4_dequantize`` raises for a bad ``packed``/``quant_state``; ``TypeError`` naming the operand and
its dtype when a dtype is not one the backend computes in or two that must match do not.

Dispatch: ``backend.uses_triton`` (CUDA by default, or ``LORA_ENGINE_BACKEND=triton``) → ``kernels.nf4_lora_linear``
(a fused dequantize-in-GEMV for ≤ 64 rows; above, a dequantize-in-GEMM or a decode into a buffer + the dense
kernels, chosen by ``kernels.strategy.NF4``); otherwise ``reference.nf4_lora_linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_engine import backend
from lora_engine.ops import nf4_dequantize as dequantize_op
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.ops.lora_linear import (
    REFERENCE_DTYPES,
    TRITON_DTYPES,
    draw_seed,
    fake_keep_bits,
    no_tensor,
    scaling_for,
)
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
        grad_bias = _bias_gradient(grad_out, ctx.bias_dtype) if need_bias else None
        return None, grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def _autocast(operands):
    """Every floating operand cast to the autocast dtype (differentiably), as autocast casts ``F.linear``'s."""
    device_type = operands[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return operands
    autocast_dtype = torch.get_autocast_dtype(device_type)
    return tuple(operand.to(autocast_dtype) if operand is not None else None for operand in operands)


def _math(backend_name: str):
    """The backend's math module: ``reference.nf4_lora_linear`` or (imported lazily) ``kernels.nf4_lora_linear``."""
    if backend_name == "reference":
        return reference
    # Imported here: the kernel modules need triton, and triton fixes compiled-vs-interpreted at import.
    from lora_engine.kernels import nf4_lora_linear as kernel

    return kernel


class _Nested(NamedTuple):
    """The second-level state of a double-quantized absmax, as ``QuantState.state2`` holds it."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype


class _Quantized(NamedTuple):
    """A ``QuantState`` rebuilt from the custom ops' arguments: the attributes the backends read, nothing else."""

    quant_type: str
    blocksize: int
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested: bool
    state2: _Nested | None
    offset: torch.Tensor | None


def _state_arguments(quant_state) -> tuple:
    """``quant_state`` as the custom ops take it: ``(absmax, nested_absmax, nested_code, offset, shape, blocksize,
    nested_blocksize, quant_type, weight_dtype, nested_dtype)``; the nested entries None / 0 / ``dtype`` unnested."""
    nested = quant_state.state2 if quant_state.nested else None
    return (
        quant_state.absmax, nested.absmax if nested else None, nested.code if nested else None,
        torch.as_tensor(quant_state.offset) if nested else None, list(quant_state.shape), quant_state.blocksize,
        nested.blocksize if nested else 0, quant_state.quant_type, quant_state.dtype,
        nested.dtype if nested else quant_state.dtype,
    )  # fmt: skip


def _weight4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type,
             weight_dtype, nested_dtype) -> Packed4bit:  # fmt: skip
    """The ``Packed4bit`` the backends take, from ``_state_arguments``' entries."""
    nested = nested_absmax is not None
    state2 = _Nested(nested_absmax, nested_code, nested_blocksize, nested_dtype) if nested else None
    quant_state = _Quantized(
        quant_type, blocksize, absmax, tuple(shape), weight_dtype, nested, state2, offset if nested else None
    )
    return Packed4bit(packed, quant_state, dequantize_op.code_on(quant_type, packed.device))


@torch.library.custom_op("lora_engine::nf4_lora_linear_forward", mutates_args=())
def _forward_op(
    backend_name: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    weight_dtype: torch.dtype,
    nested_dtype: torch.dtype,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, xa, keep_bits)`` of ``backend_name``'s ``forward`` (an empty tensor for no mask); operands already in
    the dtypes they are computed in (``nf4_lora_linear`` applies autocast first)."""
    weight4 = _weight4(
        packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type,
        weight_dtype, nested_dtype,
    )  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):
        out, xa, keep_bits = _math(backend_name).forward(
            x, weight4, bias, lora_A, lora_B, scaling_for(backend_name, scaling), dropout_p, seed
        )
    return out, xa, keep_bits if keep_bits is not None else no_tensor(x)


@_forward_op.register_fake
def _forward_fake(
    _backend_name, x, packed, absmax, nested_absmax, nested_code, offset, shape, *_static_and_rest
):
    *_, lora_A, lora_B, _scaling, dropout_p, _seed = _static_and_rest
    rank, in_features = lora_A.shape
    n_rows = x.numel() // in_features if in_features else 0
    out = x.new_empty((*x.shape[:-1], shape[0]))
    xa = x.new_empty((n_rows, rank), dtype=lora_A.dtype)  # both backends flatten x's leading dims
    return out, xa, fake_keep_bits(x, n_rows, in_features, dropout_p)


@torch.library.custom_op("lora_engine::nf4_lora_linear_backward", mutates_args=())
def _backward_op(
    backend_name: str,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    weight_dtype: torch.dtype,
    nested_dtype: torch.dtype,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    keep_bits: torch.Tensor | None,
    scaling: torch.Tensor,
    dropout_p: float,
    need_x: bool,
    need_A: bool,
    need_B: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)`` of ``backend_name``'s ``backward``, an empty tensor for each one not asked for."""
    weight4 = _weight4(
        packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type,
        weight_dtype, nested_dtype,
    )  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):
        grads = _math(backend_name).backward(
            grad_out, x, weight4, lora_A, lora_B, xa, keep_bits, scaling_for(backend_name, scaling), dropout_p,
            (need_x, need_A, need_B),
        )  # fmt: skip
    return tuple(grad if grad is not None else no_tensor(x) for grad in grads)


@_backward_op.register_fake
def _backward_fake(backend_name, grad_out, x, *_weight_and_rest):
    *_, lora_A, lora_B, _xa, _keep_bits, _scaling, _dropout_p, need_x, need_A, need_B = _weight_and_rest
    return tuple(
        torch.empty_like(like, memory_format=torch.contiguous_format) if needed else no_tensor(x)
        for like, needed in ((x, need_x), (lora_A, need_A), (lora_B, need_B))
    )


# The forward op's arguments: where the 4-bit weight's eleven (packed … nested_dtype) sit, and the rest.
_WEIGHT = slice(2, 13)


def _setup_backward(ctx, inputs, output):
    backend_name, x = inputs[:2]
    weight = inputs[_WEIGHT]
    bias, lora_A, lora_B, scaling, dropout_p, _ = inputs[13:]
    _, xa, keep_bits = output
    tensors, ctx.weight_static = weight[:5], weight[5:]
    ctx.save_for_backward(x, *tensors, lora_A, lora_B, xa, keep_bits if dropout_p > 0.0 else None)
    ctx.backend_name, ctx.bias_dtype = backend_name, bias.dtype if bias is not None else None
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, grad_out, _grad_xa, _grad_keep_bits):
    x, *tensors, lora_A, lora_B, xa, keep_bits = ctx.saved_tensors
    need_x, need_bias, need_A, need_B = (ctx.needs_input_grad[1], *ctx.needs_input_grad[13:16])
    grad_x, grad_A, grad_B = _backward_op(
        ctx.backend_name, grad_out, x, *tensors, *ctx.weight_static, lora_A, lora_B, xa, keep_bits, ctx.scaling,
        ctx.dropout_p, need_x, need_A, need_B,
    )  # fmt: skip
    grad_bias = _bias_gradient(grad_out, ctx.bias_dtype) if need_bias else None
    grads = [None] * 19  # one per forward-op argument: x, bias, lora_A, lora_B get theirs
    grads[1] = grad_x if need_x else None
    grads[13:16] = grad_bias, grad_A if need_A else None, grad_B if need_B else None
    return tuple(grads)


_forward_op.register_autograd(_backward, setup_context=_setup_backward)


def _bias_gradient(grad_out: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    """``Σ dy`` over every row, summed in fp32, in the bias' dtype."""
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(bias_dtype)


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
    backend_name = "triton" if backend.uses_triton(OP, x.device) else "reference"
    x, bias, lora_A, lora_B = _autocast((x, bias, lora_A, lora_B))
    dtypes = TRITON_DTYPES if backend_name == "triton" else REFERENCE_DTYPES
    check_operands(x, packed, quant_state, bias, lora_A, lora_B, dtypes)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    if torch.compiler.is_compiling():
        if not isinstance(
            scaling, torch.Tensor
        ):  # the custom op takes a tensor: a hot-swappable one stays one
            scaling = torch.tensor(scaling, dtype=torch.float64)
        out, _, _ = _forward_op(
            backend_name, x, packed, *_state_arguments(quant_state), bias, lora_A, lora_B, scaling,
            float(dropout_p), seed,
        )  # fmt: skip
        return out
    weight4 = Packed4bit(packed, quant_state, dequantize_op.code_on(quant_state.quant_type, packed.device))
    return Nf4LoraLinearFunction.apply(
        _math(backend_name), x, weight4, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed
    )
