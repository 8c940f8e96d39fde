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
    # Fold the scaling into B and append an all-zero adapter: index -1 picks it, so base-only rows need no mask
    # and no pass over the [B, T, out] result.
    scaled_B = lora_B * scaling.to(lora_B.dtype)[:, None, None]
    lora_A = torch.cat([lora_A, lora_A.new_zeros(1, *lora_A.shape[1:])])
    scaled_B = torch.cat([scaled_B, scaled_B.new_zeros(1, *scaled_B.shape[1:])])
    hidden = torch.bmm(rows, lora_A[row_adapter].transpose(1, 2))  # [B, T, r]
    delta = torch.bmm(hidden, scaled_B[row_adapter].transpose(1, 2))  # [B, T, out]
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])
