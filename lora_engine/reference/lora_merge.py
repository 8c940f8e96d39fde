"""Pure-PyTorch merge and unmerge of a LoRA delta into a dense base weight."""

from __future__ import annotations

import torch


def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """``s · B A`` in fp32, shaped like the base weight: ``[out, in]``, or ``[in, out]`` if ``fan_in_fan_out``."""
    delta = (lora_B.float() @ lora_A.float()).mul_(scaling)
    return delta.T if fan_in_fan_out else delta


@torch.no_grad()
def lora_merge_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool,
    subtract: bool,
    check_finite: bool,
) -> None:
    """``weight ± s · B A`` in place; see ``ops.lora_merge`` for the contract."""
    delta = lora_delta(lora_A, lora_B, -scaling if subtract else scaling, fan_in_fan_out)
    if not check_finite:
        weight.add_(delta.to(weight.dtype))
        return
    merged = weight + delta.to(weight.dtype)
    if not torch.isfinite(merged).all():
        raise FloatingPointError("the merged weight would hold NaN or Inf")
    weight.copy_(merged)
