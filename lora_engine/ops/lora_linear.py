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
- ``dropout_p``: inverted dropout on the low-rank input only; pass 0 in eval. Each call draws a seed on x's
  device (``torch.randint`` from torch's generator: no host sync, no ``.item()``, so torch.compile keeps it in its
  graph and a CUDA-graph replay draws a fresh one); the forward hashes it into a keep-mask, the same bits on the
  reference and on the Triton kernels (``reference.lora_linear`` states the hash), and saves the mask bit-packed
  (``[M, ceil(in/8)]`` uint8). Backward reads it back and draws nothing.

Gradients flow to ``x``, ``lora_A``, ``lora_B``, and to ``bias`` or ``weight`` if they require grad (first order
only). Nothing is mutated. Saved for backward: x as it came, the ``[..., r]`` product ``drop(x) Aᵀ`` and the
packed mask, never a dropped or upcast copy of x.

Under ``torch.compile`` the op is the custom op pair ``lora_engine::lora_linear_forward`` / ``_backward``
(``torch.library.custom_op``, with fake implementations), so a training step compiles to one graph; eager calls
take the equivalent ``LoraLinearFunction`` directly, which skips the custom-op dispatcher's per-call overhead.

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
    "draw_seed",
    "check_operands",
    "lora_linear",
    "no_tensor",
    "reference_lora_linear",
    "scaling_for",
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


def _stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype


def check_operands(
    x, weight, bias, lora_A, lora_B, fan_in_fan_out: bool, dtypes: tuple[torch.dtype, ...]
) -> None:
    """The contract of the module docstring, for a backend that computes in ``dtypes``; raises what it says.

    Runs on every call of the op (every LoRA layer's forward), so each fact is read once: one device comparison
    per operand, autocast asked once, the error messages built only when a check fails.
    """
    device = x.device
    if (
        lora_A.device != device
        or lora_B.device != device
        or (weight is not None and weight.device != device)
        or (bias is not None and bias.device != device)
    ):
        check_same_device(OP, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    dtype_of = _computed_dtype if torch.is_autocast_enabled(device.type) else _stored_dtype
    x_dtype, adapter_dtype, lora_B_dtype = dtype_of(x), dtype_of(lora_A), dtype_of(lora_B)
    if x_dtype not in dtypes:
        raise TypeError(f"{OP}: x has dtype {x_dtype}; expected one of {_names(dtypes)}")
    if adapter_dtype != lora_B_dtype:
        raise TypeError(f"{OP}: lora_A ({adapter_dtype}) and lora_B ({lora_B_dtype}) must share one dtype")
    if adapter_dtype not in dtypes:
        raise TypeError(
            f"{OP}: lora_A and lora_B have dtype {adapter_dtype}; expected one of {_names(dtypes)}"
        )
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
        if weight.shape != expected:
            raise ValueError(
                f"{OP}: weight has shape {tuple(weight.shape)}; expected {expected} (fan_in_fan_out={fan_in_fan_out})"
            )
        if dtype_of(weight) != x_dtype:
            raise TypeError(f"{OP}: weight has dtype {dtype_of(weight)} but x has {x_dtype}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)}; expected ({out_features},)")
        if dtype_of(bias) != x_dtype:
            raise TypeError(f"{OP}: bias has dtype {dtype_of(bias)} but x has {x_dtype}")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(dtype) for dtype in dtypes)


def _base_gradients(grad_out, x, weight, bias_dtype, fan_in_fan_out, need_weight, need_bias):
    """``(dW, dbias)``, each None unless asked for: ``dyᵀ x`` and ``Σ dy`` with torch, for every backend."""
    grad_weight = grad_bias = None
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
    if need_weight:
        grad_weight = grad_rows.T.to(weight.dtype) @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        if fan_in_fan_out:
            grad_weight = grad_weight.T
    if need_bias:
        grad_bias = grad_rows.sum(0, dtype=torch.float32).to(bias_dtype)
    return grad_weight, grad_bias


class LoraLinearFunction(torch.autograd.Function):
    """Autograd of ``lora_linear`` on one backend's math (``math``: a module with ``forward`` and ``backward``),
    for eager calls (``lora_engine::lora_linear_forward`` is its torch.compile twin).

    Saves x, the ``[..., r]`` product ``forward`` returns and the packed dropout mask. The backend computes the
    output and the gradients of x, A and B; the gradients of W and of the bias (not the LoRA case: both are frozen
    in training) are computed here, the same way whatever the backend. First order only.
    """

    @staticmethod
    def forward(ctx, math, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
        out, xa, keep_bits = math.forward(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, keep_bits)
        ctx.math = math
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa, keep_bits = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[1:6]
        grad_x, grad_A, grad_B = ctx.math.backward(
            grad_out,
            x,
            weight,
            lora_A,
            lora_B,
            xa,
            keep_bits,
            ctx.scaling,
            ctx.dropout_p,
            ctx.fan_in_fan_out,
            (need_x, need_A, need_B),
        )
        grad_weight, grad_bias = _base_gradients(
            grad_out, x, weight, ctx.bias_dtype, ctx.fan_in_fan_out, need_weight, need_bias
        )
        return None, grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None


def _math(backend_name: str):
    """The backend's math module: ``reference.lora_linear`` or (imported lazily) ``kernels.lora_linear``."""
    if backend_name == "reference":
        return reference
    from lora_engine.kernels import lora_linear as kernel

    return kernel


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """What a custom op returns for "no tensor" (its outputs cannot be None): an empty uint8 tensor."""
    return like.new_empty(0, dtype=torch.uint8)


def fake_keep_bits(x: torch.Tensor, n_rows: int, in_features: int, dropout_p: float) -> torch.Tensor:
    """A forward op's fake packed keep-mask: ``[n_rows, ceil(in_features / 8)]`` uint8 under dropout, else
    ``no_tensor``."""
    if dropout_p > 0.0:
        return x.new_empty((n_rows, -(-in_features // 8)), dtype=torch.uint8)
    return no_tensor(x)


def scaling_for(backend_name: str, scaling: torch.Tensor) -> float | torch.Tensor:
    """The custom ops' 0-d ``scaling`` as the backend's math takes it: the reference multiplies by the tensor (the
    same fp32 products as by the float), a kernel gets its value (read on the host, outside any graph)."""
    return scaling if backend_name == "reference" else float(scaling)


@torch.library.custom_op("lora_engine::lora_linear_forward", mutates_args=())
def _forward_op(
    backend_name: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, xa, keep_bits)`` of ``backend_name``'s ``forward`` (an empty tensor for no mask); operands already in
    the dtypes they are computed in (``_compiled_lora_linear`` applies autocast first)."""
    with torch.autocast(x.device.type, enabled=False):
        out, xa, keep_bits = _math(backend_name).forward(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            scaling_for(backend_name, scaling),
            dropout_p,
            seed,
            fan_in_fan_out,
        )
    return out, xa, keep_bits if keep_bits is not None else no_tensor(x)


@_forward_op.register_fake
def _forward_fake(backend_name, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    rank, in_features = lora_A.shape
    n_rows = x.numel() // in_features if in_features else 0
    out_dtype = x.dtype if weight is not None else lora_A.dtype
    out = x.new_empty((*x.shape[:-1], lora_B.shape[0]), dtype=out_dtype)
    # The reference keeps x's leading dims on the [..., r] product; the kernels flatten them.
    xa_shape = (*x.shape[:-1], rank) if backend_name == "reference" else (n_rows, rank)
    xa = x.new_empty(xa_shape, dtype=lora_A.dtype)
    return out, xa, fake_keep_bits(x, n_rows, in_features, dropout_p)


@torch.library.custom_op("lora_engine::lora_linear_backward", mutates_args=())
def _backward_op(
    backend_name: str,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    keep_bits: torch.Tensor | None,
    scaling: torch.Tensor,
    dropout_p: float,
    fan_in_fan_out: bool,
    need_x: bool,
    need_A: bool,
    need_B: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)`` of ``backend_name``'s ``backward``, an empty tensor for each one not asked for."""
    with torch.autocast(x.device.type, enabled=False):
        grads = _math(backend_name).backward(
            grad_out, x, weight, lora_A, lora_B, xa, keep_bits, scaling_for(backend_name, scaling), dropout_p,
            fan_in_fan_out,
            (need_x, need_A, need_B),
        )  # fmt: skip
    return tuple(grad if grad is not None else no_tensor(x) for grad in grads)


@_backward_op.register_fake
def _backward_fake(
    backend_name, grad_out, x, weight, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, fan_in_fan_out,
    need_x, need_A, need_B,
):  # fmt: skip
    return tuple(
        torch.empty_like(like, memory_format=torch.contiguous_format) if needed else no_tensor(x)
        for like, needed in ((x, need_x), (lora_A, need_A), (lora_B, need_B))
    )


def _setup_backward(ctx, inputs, output):
    backend_name, x, weight, bias, lora_A, lora_B, scaling, dropout_p, _, fan_in_fan_out = inputs
    _, xa, keep_bits = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, keep_bits if dropout_p > 0.0 else None)
    ctx.backend_name, ctx.bias_dtype = backend_name, bias.dtype if bias is not None else None
    ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out


def _backward(ctx, grad_out, _grad_xa, _grad_keep_bits):
    x, weight, lora_A, lora_B, xa, keep_bits = ctx.saved_tensors
    need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[1:6]
    grad_x, grad_A, grad_B = _backward_op(
        ctx.backend_name, grad_out, x, weight, lora_A, lora_B, xa, keep_bits, ctx.scaling, ctx.dropout_p,
        ctx.fan_in_fan_out, need_x, need_A, need_B,
    )  # fmt: skip
    grad_weight, grad_bias = _base_gradients(
        grad_out, x, weight, ctx.bias_dtype, ctx.fan_in_fan_out, need_weight, need_bias
    )
    return (
        None,
        grad_x if need_x else None,
        grad_weight,
        grad_bias,
        grad_A if need_A else None,
        grad_B if need_B else None,
        None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_backward)


def _autocast(operands):
    """Every floating operand cast to the autocast dtype (differentiably), as autocast casts ``F.linear``'s."""
    device_type = operands[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return operands
    autocast_dtype = torch.get_autocast_dtype(device_type)
    return tuple(operand.to(autocast_dtype) if operand is not None else None for operand in operands)


def _run(backend_name, math, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """The autograd'ed op: the custom op while torch.compile traces, ``LoraLinearFunction`` otherwise."""
    if torch.compiler.is_compiling():
        x, weight, bias, lora_A, lora_B = _autocast((x, weight, bias, lora_A, lora_B))
        if not isinstance(
            scaling, torch.Tensor
        ):  # the custom op takes a tensor: a hot-swappable one stays one
            scaling = torch.tensor(scaling, dtype=torch.float64)
        out, _, _ = _forward_op(
            backend_name, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
        )
        return out
    if backend_name == "triton":
        scaling = float(scaling)  # a kernel argument
    return LoraLinearFunction.apply(
        math, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
    )


def reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """The op on the reference backend, with the dropout ``seed`` given (``draw_seed``'s int64 ``[1]`` tensor on
    x's device; None when ``dropout_p == 0``); checks the operands first."""
    check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out, REFERENCE_DTYPES)
    if dropout_p == 0.0 and x.dtype == lora_A.dtype:
        # Plain autograd saves x once (no copy) and runs its backward in C++: faster than the Function here.
        return reference.eager_lora_linear(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out)
    return _run(
        "reference", reference, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
    )


def triton_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """The op on the Triton kernels, with the dropout ``seed`` given (as for ``reference_lora_linear``); checks
    the operands first.

    Under ``torch.autocast`` every floating operand is first cast to the autocast dtype, as autocast does to the
    reference's ``F.linear`` calls, adapters included (differentiable casts, so fp32 parameters get fp32 grads).
    """
    check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out, TRITON_DTYPES)
    # Imported here: the kernel modules need triton, and triton fixes compiled-vs-interpreted at import.
    from lora_engine.kernels import lora_linear as kernel

    x, weight, bias, lora_A, lora_B = _autocast((x, weight, bias, lora_A, lora_B))
    return _run(
        "triton",
        kernel,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scaling,
        float(dropout_p),
        seed,
        fan_in_fan_out,
    )


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed: an int64 ``[1]`` tensor in ``[0, 2**31)`` on ``device``, from torch's generator for that
    device, with no host sync (the hash multiplies it by a 32-bit constant: it must stay below 2**31)."""
    return torch.randint(0, 2**31, (1,), dtype=torch.int64, device=device)


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
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    return run(x, weight, bias, lora_A, lora_B, _as_scalar(scaling), float(dropout_p), seed, fan_in_fan_out)


def _as_scalar(scaling: float | torch.Tensor) -> float | torch.Tensor:
    # A tensor stays a tensor: float() of it would break a compiled graph (and bake the value in).
    return scaling if isinstance(scaling, torch.Tensor) else float(scaling)
