"""Pure-PyTorch mixed-adapter batch: gather each row's factors once, then two batched matmuls."""

from __future__ import annotations

import math

import torch


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """``ops.grouped_lora`` in PyTorch; see its docstring for the contract."""
    batch, in_features = x.shape[0], x.shape[-1]
    tokens_per_row = math.prod(x.shape[1:-1])
    rows = x.to(lora_A.dtype).reshape(batch, tokens_per_row, in_features)  # [B, T, in]
    # Rows outside the stack (-1) borrow adapter 0's factors and have their rank-sized hidden [B, T, r] zeroed
    # (``where``, so even an overflowed product becomes an exact 0). The scaling is applied there too, the
    # smallest tensor on the way: no scaled copy of B, no zero adapter appended to the stacks, and no extra
    # pass over the [B, T, out] result.
    routed = row_adapter >= 0
    index = row_adapter.clamp(min=0)
    hidden = torch.bmm(rows, lora_A[index].transpose(1, 2))  # [B, T, r]
    row_scaling = scaling.to(lora_A.dtype)[index][:, None, None]
    hidden = torch.where(routed[:, None, None], hidden * row_scaling, 0.0)
    delta = torch.bmm(hidden, lora_B[index].transpose(1, 2))  # [B, T, out]
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])
