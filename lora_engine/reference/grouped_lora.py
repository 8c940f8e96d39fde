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
    index = row_adapter.clamp(min=0)
    # A base-only row still gathers adapter 0's factors; its zero row scale removes the product.
    row_scale = torch.where(row_adapter >= 0, scaling[index], torch.zeros_like(scaling[index]))
    hidden = torch.bmm(rows, lora_A[index].transpose(1, 2))  # [B, T, r]
    delta = torch.bmm(hidden, lora_B[index].transpose(1, 2)) * row_scale.to(lora_A.dtype)[:, None, None]
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])
