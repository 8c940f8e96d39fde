"""Pure-PyTorch DoRA row norms from a cached ``‖W_o‖²`` and two rank-sized products (see ``ops.dora_norm``)."""

from __future__ import annotations

import torch

# Rows of a non-fp32 weight converted to fp32 at a time: bounds the temporary to ROW_CHUNK · in floats.
ROW_CHUNK = 1024
# A row whose squared norm falls below this fraction of ‖W_o‖² lost most of its digits to cancellation in the
# three-term sum (relative error ≈ eps · ‖W_o‖² / norm²); such rows are recomputed directly from W_o + s·B_o A.
CANCELLATION = 1e-2


def _row_chunks(weight: torch.Tensor, fan_in_fan_out: bool):
    """fp32 ``[rows, in]`` slices of the weight in ``[out, in]`` layout, ``ROW_CHUNK`` output rows at a time."""
    rows = weight.T if fan_in_fan_out else weight
    for start in range(0, rows.shape[0], ROW_CHUNK):
        yield rows[start : start + ROW_CHUNK].float()


@torch.no_grad()
def weight_row_sq_norm(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``‖W_o‖²`` per output row, fp32 ``[out]``."""
    return torch.cat([chunk.square().sum(dim=1) for chunk in _row_chunks(weight, fan_in_fan_out)])


@torch.no_grad()
def dora_norm(
    weight: torch.Tensor,
    weight_sq_norm: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """``‖W_o + s·B_o A‖`` per output row, fp32 ``[out]``; see ``ops.dora_norm`` for the contract."""
    lora_A32, lora_B32 = lora_A.float(), lora_B.float()
    a_t = lora_A32.T
    weight_times_a = torch.cat([chunk @ a_t for chunk in _row_chunks(weight, fan_in_fan_out)])  # [out, r]
    gram = lora_A32 @ a_t  # [r, r]
    cross = (lora_B32 * weight_times_a).sum(dim=1)
    quadratic = ((lora_B32 @ gram) * lora_B32).sum(dim=1)
    squared = weight_sq_norm + (2 * scaling) * cross + (scaling * scaling) * quadratic
    norm = squared.clamp_min(0).sqrt()
    cancelled = (squared < CANCELLATION * weight_sq_norm).nonzero().squeeze(1)
    if cancelled.numel():
        rows = (weight.T if fan_in_fan_out else weight)[cancelled].float()
        norm[cancelled] = torch.linalg.norm(rows + scaling * (lora_B32[cancelled] @ lora_A32), dim=1)
    return norm
