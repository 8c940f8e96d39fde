"""The frozen base layer's products on the CPU, ``x Wᵀ + b`` and its input gradient ``dy W``, through oneDNN.

On the CPU, fp32 ``F.linear`` and ``mm`` run MKL's sgemm; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``,
the op torch's own CPU compiler emits for linear layers) computes the same products about twice as fast on the
AMD EPYC we measure on (MKL picks a slower code path on non-Intel CPUs): 128 × 256 → 688 rows 0.20 ms against
0.41 ms, 4096 × 512 → 512 17 ms against 39 ms, 16 rows of a 1024 × 1024 layer 0.21 ms against 1.4 ms, one thread
or two alike; the input gradient the same. The results are the same dot products summed in another order:
within fp32 rounding of ``F.linear`` (tested).

Taken only where it gives what ``F.linear`` gives: fp32 CPU tensors outside ``torch.autocast`` (autocast would
run ``F.linear`` in bf16), outside torch.compile's tracing (the compiler picks its own kernels), with a frozen
weight and bias when autograd records (oneDNN's op has no derivative: ``_FrozenLinear`` supplies the input's).
Everything else calls ``F.linear`` / ``mm``. Mutates nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Looked up once: a torch built without oneDNN (or a later one without this op) keeps MKL's path.
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def _onednn_computes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[0] > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with gradients for ``x`` only (W and b frozen), both products on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = _onednn_linear(grad_out, weight.T, None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def linear(x_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x_rows [N, in] Wᵀ + b`` (``weight [out, in]``, any strides) → a fresh ``[N, out]`` tensor, differentiable
    in ``x_rows``, and in ``weight`` / ``bias`` when they require grad (then through ``F.linear``)."""
    if not _onednn_computes(x_rows, weight):
        return F.linear(x_rows, weight, bias)
    if not torch.is_grad_enabled():
        return _onednn_linear(x_rows, weight, bias)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x_rows, weight, bias)
    if not x_rows.requires_grad:
        return _onednn_linear(x_rows, weight, bias)
    return _FrozenLinear.apply(x_rows, weight, bias)
