"""The ``lora_linear`` op: a frozen linear layer plus one LoRA adapter, in one call.

Contract::

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ

- ``x``: ``[..., in]``, any leading dims and strides; fp32, fp16 or bf16 (the reference also takes float64).
- ``weight``: the frozen base weight ``W``, ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``, as in
  transformers' ``Conv1D``), same dtype as ``x``; or ``None``, then only the low-rank term is returned.
- ``bias``: ``[out]`` in x's dtype, or ``None``.
- ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``, one dtype; the low-rank term is computed in it (peft keeps
  adapters in fp32 on half-precision bases) and the sum is returned in the base output's dtype.
- All on one device. Under ``torch.autocast`` the dtypes are those autocast computes in, for every backend.
- ``scaling``: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rslora): a float, or a 0-d tensor on ``x``'s
  device after ``prepare_model_for_compiled_hotswap`` (a tensor's value is not baked into a compiled graph, so a
  hot-swap that changes it recompiles nothing). The Triton kernel reads the tensor's value.
- ``dropout_p``: inverted dropout on the low-rank input only; pass 0 in eval. The mask is drawn from a seed
  taken from torch's global generator and regenerated in backward. The reference and the Triton kernel draw
  different masks from the same seed (torch's generator vs Philox in the kernel); each is a valid dropout.

Gradients flow to ``x``, ``lora_A``, ``lora_B``, and to ``bias`` or ``weight`` if they require grad (first order
only). Nothing is mutated. Saved for backward: x as it came, the ``[..., r]`` product ``drop(x) Aᵀ`` and the
seed, never a dropped or upcast copy of x.

Raises, on every backend and with the same message for the same operands: ``ValueError`` naming the operand and
its shape when the shapes do not chain, or the devices when they differ; ``TypeError`` naming the operand and its
dtype when a dtype is not one the backend computes in or two that must match do not.

This module owns the contract checks, the dispatch (``backend.uses_triton``) and the autograd Function; the math
is the backend's: ``reference.lora_linear`` or ``lora_engine.kernels.lora_linear``, each a ``forward`` and a
``backward`` with the same signature.
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.reference import lora_linear as reference

__all__ = [
    "LoraLinearFunction",
    "check_operands",
    "lora_linear",
    "reference_lora_linear",
    "triton_lora_linear",
]

OP = "lora_linear"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float64, *TRITON_DTYPES)


def _computed_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype ``tensor`` is computed in: the autocast dtype for a floating tensor under autocast."""
    device_type = tensor.device.type
    if tensor.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def check_operands(
    x, weight, bias, lora_A, lora_B, fan_in_fan_out: bool, dtypes: tuple[torch.dtype, ...]
) -> None:
    """The contract of the module docstring, for a backend that computes in ``dtypes``; raises what it says."""
    check_same_device(OP, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    x_dtype, adapter_dtype = _computed_dtype(x), _computed_dtype(lora_A)
    names = ", ".join(str(dtype) for dtype in dtypes)
    if x_dtype not in dtypes:
        raise TypeError(f"{OP}: x has dtype {x_dtype}; expected one of {names}")
    if adapter_dtype != _computed_dtype(lora_B):
        raise TypeError(
            f"{OP}: lora_A ({adapter_dtype}) and lora_B ({_computed_dtype(lora_B)}) must share one dtype"
        )
    if adapter_dtype not in dtypes:
        raise TypeError(f"{OP}: lora_A and lora_B have dtype {adapter_dtype}; expected one of {names}")
    check_dims(OP, "lora_A", lora_A, 2, "[r, in]")
    check_dims(OP, "lora_B", lora_B, 2, "[out, r]")
    rank, in_features = lora_A.shape
    out_features = lora_B.shape[0]
    if x.dim() == 0:
        raise ValueError(f"{OP}: x has shape (); expected [..., {in_features}]")
    if x.shape[-1] != in_features or lora_B.shape[1] != rank:
        raise ValueError(
            f"{OP}: x [..., {x.shape[-1]}], lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)} do not chain as [..., in] → [r, in] → [out, r]"
        )
    if weight is not None:
        expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{OP}: weight has shape {tuple(weight.shape)}; expected {expected} (fan_in_fan_out={fan_in_fan_out})"
            )
        if _computed_dtype(weight) != x_dtype:
            raise TypeError(f"{OP}: weight has dtype {_computed_dtype(weight)} but x has {x_dtype}")
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)}; expected ({out_features},)")
        if _computed_dtype(bias) != x_dtype:
            raise TypeError(f"{OP}: bias has dtype {_computed_dtype(bias)} but x has {x_dtype}")


class LoraLinearFunction(torch.autograd.Function):
    """Autograd of ``lora_linear`` on one backend's math (``math``: a module with ``forward`` and ``backward``).

    Saves x, the ``[..., r]`` product ``forward`` returns and the dropout seed. The backend computes the output
    and the gradients of x, A and B; the gradients of W and of the bias (not the LoRA case: both are frozen in
    training) are computed here, the same way whatever the backend. First order only.
    """

    @staticmethod
    def forward(ctx, math, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
        out, xa = math.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.math = math
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.fan_in_fan_out = scaling, dropout_p, seed, fan_in_fan_out
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[1:6]
        grad_x, grad_A, grad_B = ctx.math.backward(
            grad_out,
            x,
            weight,
            lora_A,
            lora_B,
            xa,
            ctx.scaling,
            ctx.dropout_p,
            ctx.seed,
            ctx.fan_in_fan_out,
            (need_x, need_A, need_B),
        )
        grad_weight = grad_bias = None
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        if need_weight:
            grad_weight = grad_rows.T.to(weight.dtype) @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
            if ctx.fan_in_fan_out:
                grad_weight = grad_weight.T
        if need_bias:
            grad_bias = grad_rows.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return None, grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None


def reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """The op on the reference backend, with the dropout ``seed`` given; checks the operands first."""
    check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out, REFERENCE_DTYPES)
    if dropout_p == 0.0 and x.dtype == lora_A.dtype:
        # Plain autograd saves x once (no copy) and runs its backward in C++: faster than the Function here.
        return reference.eager_lora_linear(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out)
    return LoraLinearFunction.apply(
        reference, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
    )


def triton_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """The op on the Triton kernels, with the dropout ``seed`` given; checks the operands first.

    Under ``torch.autocast`` every floating operand is first cast to the autocast dtype, as autocast does to the
    reference's ``F.linear`` calls, adapters included (differentiable casts, so fp32 parameters get fp32 grads).
    """
    check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out, TRITON_DTYPES)
    # Imported here: the kernel modules need triton, and triton fixes compiled-vs-interpreted at import.
    from lora_engine.kernels import lora_linear as kernel

    if torch.is_autocast_enabled(x.device.type):
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, lora_A, lora_B = (
            operand.to(autocast_dtype) if operand is not None else None
            for operand in (x, weight, bias, lora_A, lora_B)
        )
    return LoraLinearFunction.apply(
        kernel, x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), int(seed), fan_in_fan_out
    )


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``[..., in]`` → ``[..., out]``; see the module docstring."""
    run = triton_lora_linear if backend.uses_triton(OP, x.device) else reference_lora_linear
    seed = _draw_seed() if dropout_p > 0.0 else 0
    return run(x, weight, bias, lora_A, lora_B, _as_scalar(scaling), float(dropout_p), seed, fan_in_fan_out)


def _as_scalar(scaling: float | torch.Tensor) -> float | torch.Tensor:
    # A tensor stays a tensor: float() of it would break a compiled graph (and bake the value in).
    return scaling if isinstance(scaling, torch.Tensor) else float(scaling)
