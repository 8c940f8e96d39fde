"""The ``grouped_lora`` op: a batch whose rows each run their own LoRA adapter (mixed-adapter batches).

Contract::

    delta[b] = s_i · (x[b] A_iᵀ) B_iᵀ    with i = row_adapter[b];   delta[b] = 0 where row_adapter[b] = -1

- ``x``: ``[B, ..., in]``; row ``b`` is every token of batch entry ``b``. Any dtype; computed in the adapters'.
- ``row_adapter``: ``[B]`` int64 on ``x``'s device, an index into the stacked adapters, or -1 for the base model
  only (``"__base__"``, or an adapter this layer does not hold).
- ``lora_A``: ``[n, r, in]``, ``lora_B``: ``[n, out, r]`` — adapters of different ranks are zero-padded to the
  largest ``r``; ``scaling``: ``[n]`` fp32.
- Returns ``delta [B, ..., out]`` in the adapters' dtype. Nothing is mutated.

One grouped computation per call, whatever the number of adapters: no loop over adapters, no boolean masks.

Raises ``ValueError`` naming the operand when a shape does not fit the above or the operands are on different
devices, ``TypeError`` when ``row_adapter`` is not an integer tensor or the adapters' dtypes differ. The values of
``row_adapter`` are not checked (that would synchronise with the GPU): torch's indexing refuses one ``>= n + 1`` or
``< -(n + 1)``, and a negative one other than -1 silently picks an adapter counted from the end. There is no Triton kernel yet: the reference always runs, and ``LORA_ENGINE_BACKEND=triton`` is refused.
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.reference.grouped_lora import grouped_lora as reference_grouped_lora

OP = "grouped_lora"


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


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """``[B, ..., in]`` → ``[B, ..., out]``; see the module docstring."""
    backend.require_reference(OP)
    check_operands(x, row_adapter, lora_A, lora_B, scaling)
    return reference_grouped_lora(x, row_adapter, lora_A, lora_B, scaling)
