"""The ``grouped_lora`` op: a batch whose rows each run their own LoRA adapter (mixed-adapter batches).

Contract::

    delta[b] = s_i · (x[b] A_iᵀ) B_iᵀ    with i = row_adapter[b];   delta[b] = 0 where row_adapter[b] = -1

- ``x``: ``[B, ..., in]``; row ``b`` is every token of batch entry ``b``. Any dtype; computed in the adapters'.
- ``row_adapter``: ``[B]`` int64 on ``x``'s device, an index into the stacked adapters, or -1 for the base model
  only (``"__base__"``, or an adapter this layer does not hold).
- ``lora_A``: ``[n, r, in]``, ``lora_B``: ``[n, out, r]`` — adapters of different ranks are zero-padded to the
  largest ``r``; ``scaling``: ``[n]`` fp32.
- Returns ``delta [B, ..., out]`` in the adapters' dtype. Nothing is mutated.
- With ``out`` (``[B, ..., out]``, contiguous, any float dtype): ``out += delta`` in place (the sum rounded to ``out``'s
  dtype, as ``(out + delta).to(out.dtype)``) and ``out`` is returned; base-only rows are not touched at all. For
  inference: refused (``ValueError``) when autograd would have to see it (grad mode on and an operand requiring
  grad).
- ``segments`` (optional): ``segment_rows(row_adapter, tokens_per_row, n)``, the tokens grouped by adapter
  for the backend that runs them, when the caller computed it once for many layers; else computed here.

No boolean masks. On the CPU (``reference.grouped_lora``) the rows are segmented by adapter on the host, one span
of rows per adapter present, two matmuls each, on slices of the batch or of one gathered copy of its rows (mixed
batches on the CPU call ``reference.grouped_lora.segmented_lora`` directly, on the factors as stored; see
``runs_segmented``); on other devices without Triton each row's factors are gathered. On CUDA (or
``LORA_ENGINE_BACKEND=triton``) two Triton launches (``kernels/grouped_lora.py``: shrink into ``[T, r_max]``,
expand into the output), deterministic, with no host sync; base-only tokens do no work. Gradients (to ``x``, the
factors and nothing else) flow through the Triton path by recomputing the reference in backward.

Raises ``ValueError`` naming the operand when a shape does not fit the above or the operands are on different
devices, ``TypeError`` when ``row_adapter`` is not an integer tensor or the adapters' dtypes differ. The values of
``row_adapter`` are not checked on a GPU (that would synchronise with it): torch's indexing refuses one ``>= n + 1``
or ``< -(n + 1)``, and a negative one other than -1 silently picks an adapter counted from the end (on the Triton
path any negative one means the base model). On the CPU one ``>= n`` raises ``IndexError`` and any negative one
means the base model.
"""

from __future__ import annotations

import math

import torch

from lora_engine import backend
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.reference.grouped_lora import grouped_lora as reference_grouped_lora
from lora_engine.reference.grouped_lora import row_segments

OP = "grouped_lora"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_operands(x, row_adapter, lora_A, lora_B, scaling) -> None:
    """The contract of the module docstring, on shapes, dtypes and devices; raises what it says."""
    check_same_device(
        OP, {"x": x, "row_adapter": row_adapter, "lora_A": lora_A, "lora_B": lora_B, "scaling": scaling}
    )
    check_dims(OP, "lora_A", lora_A, 3, "[n, r, in]")
    check_dims(OP, "lora_B", lora_B, 3, "[n, out, r]")
    adapters, rank, in_features = lora_A.shape
    if tuple(lora_B.shape[::2]) != (adapters, rank):
        raise ValueError(
            f"{OP}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not stack as "
            "[n, r, in] and [n, out, r]"
        )
    if tuple(scaling.shape) != (adapters,):
        raise ValueError(
            f"{OP}: scaling has shape {tuple(scaling.shape)}; expected ({adapters},), one per adapter"
        )
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(f"{OP}: x has shape {tuple(x.shape)}; expected [B, ..., {in_features}]")
    if tuple(row_adapter.shape) != (x.shape[0],):
        raise ValueError(
            f"{OP}: row_adapter has shape {tuple(row_adapter.shape)}; expected ({x.shape[0]},), one per row of x"
        )
    if row_adapter.dtype.is_floating_point or row_adapter.dtype.is_complex or row_adapter.dtype == torch.bool:
        raise TypeError(f"{OP}: row_adapter has dtype {row_adapter.dtype}; expected an integer dtype (int64)")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(
            f"{OP}: lora_A has dtype {lora_A.dtype} but lora_B has {lora_B.dtype}; expected one dtype"
        )


def check_out(out: torch.Tensor, x: torch.Tensor, lora_B: torch.Tensor) -> None:
    """``out`` as the module docstring requires; raises ``ValueError`` naming its shape or device."""
    expected = (*x.shape[:-1], lora_B.shape[1])
    fits = tuple(out.shape) == expected and out.device == x.device and out.dtype.is_floating_point
    if not fits or not out.is_contiguous():
        raise ValueError(
            f"{OP}: out is {tuple(out.shape)} {out.dtype} on {out.device}"
            f"{'' if out.is_contiguous() else ', not contiguous'}; expected a contiguous {expected} floating "
            f"point tensor on {x.device}"
        )


def segment_rows(row_adapter: torch.Tensor, tokens_per_row: int, adapters: int):
    """The tokens of a ``[B]`` routing grouped by adapter, as the backend that will run them wants it: the
    kernels' segments (``kernels/grouped_lora.py``: torch ops on the device, no host sync), the reference's
    ``row_segments`` on the CPU, None elsewhere (the reference needs none there). Compute it once per forward and
    pass it as ``segments``."""
    if backend.uses_triton(OP, row_adapter.device):
        from lora_engine.kernels.grouped_lora import adapter_segments

        return adapter_segments(row_adapter, tokens_per_row, adapters)
    if row_adapter.device.type == "cpu":
        return row_segments(row_adapter, adapters)
    return None


def runs_segmented(device: torch.device) -> bool:
    """Whether a mixed batch on ``device`` runs the reference's CPU segments (``reference.grouped_lora.
    segmented_lora``, which reads each adapter's factors where they are stored) rather than this op on stacked
    factors. Raises what ``backend.uses_triton`` raises."""
    return device.type == "cpu" and not backend.uses_triton(OP, device)


def _triton_add_(x, row_adapter, lora_A, lora_B, scaling, out, segments):
    """``out += delta`` by the kernels; ``x`` and ``out`` viewed as ``[T, in]`` / ``[T, out]``."""
    from lora_engine.kernels.grouped_lora import grouped_lora_

    tokens_per_row = math.prod(x.shape[1:-1])
    if segments is None:
        segments = segment_rows(row_adapter, tokens_per_row, lora_A.shape[0])
    flat_out = out.view(-1, out.shape[-1])
    grouped_lora_(x.reshape(-1, x.shape[-1]), lora_A, lora_B, scaling.float(), segments, flat_out)
    return out


class _GroupedLora(torch.autograd.Function):
    """The Triton forward; backward differentiates the reference (recomputed), which gives the same function."""

    @staticmethod
    def forward(ctx, x, row_adapter, lora_A, lora_B, scaling, segments):
        ctx.save_for_backward(x, row_adapter, lora_A, lora_B, scaling)
        delta = torch.zeros(*x.shape[:-1], lora_B.shape[1], dtype=lora_A.dtype, device=x.device)
        return _triton_add_(x, row_adapter, lora_A, lora_B, scaling, delta, segments)

    @staticmethod
    def backward(ctx, grad_delta):
        saved = ctx.saved_tensors
        inputs = [tensor.detach().requires_grad_(need) for tensor, need in zip(saved, ctx.needs_input_grad)]
        with torch.enable_grad():
            delta = reference_grouped_lora(*inputs)
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        grads = iter(torch.autograd.grad(delta, wanted, grad_delta, allow_unused=True))
        return (*(next(grads) if tensor.requires_grad else None for tensor in inputs), None)


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    segments=None,
) -> torch.Tensor:
    """``[B, ..., in]`` → ``[B, ..., out]`` (or added into ``out``); see the module docstring."""
    check_operands(x, row_adapter, lora_A, lora_B, scaling)
    if out is not None:
        check_out(out, x, lora_B)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B, scaling, out)):
            raise ValueError(
                f"{OP}: out= adds in place, which autograd cannot see; call without out= when gradients flow"
            )
    if backend.uses_triton(OP, x.device):
        if lora_A.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{OP}: the adapters have dtype {lora_A.dtype}; the Triton kernels take one of "
                f"{', '.join(map(str, KERNEL_DTYPES))} (LORA_ENGINE_BACKEND=reference computes in any)"
            )
        if out is not None:
            return _triton_add_(x, row_adapter, lora_A, lora_B, scaling, out, segments)
        return _GroupedLora.apply(x, row_adapter, lora_A, lora_B, scaling, segments)
    segments = segments if x.device.type == "cpu" else None
    if out is not None and out.device.type == "cpu":
        return reference_grouped_lora(x, row_adapter, lora_A, lora_B, scaling, out=out, segments=segments)
    delta = reference_grouped_lora(x, row_adapter, lora_A, lora_B, scaling, segments=segments)
    if out is None:
        return delta
    return out.copy_(out + delta)
