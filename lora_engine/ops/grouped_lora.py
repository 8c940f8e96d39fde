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
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.reference.grouped_lora import grouped_lora as reference_grouped_lora


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """``[B, ..., in]`` → ``[B, ..., out]``; see the module docstring."""
    backend.uses_triton("grouped_lora", x.device, has_kernel=False)
    return reference_grouped_lora(x, row_adapter, lora_A, lora_B, scaling)
