"""What the ops' contract checks share: one wording for the errors every backend raises on the same bad input."""

from __future__ import annotations

import torch


def check_same_device(op_name: str, operands: dict[str, torch.Tensor | None]) -> None:
    """Raises ``ValueError`` naming each operand's device unless all (the ``None`` ones skipped) share one."""
    devices = {name: operand.device for name, operand in operands.items() if operand is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op_name}: operands on different devices ({listed}); expected all on one device")


def check_dims(op_name: str, name: str, tensor: torch.Tensor, dims: int, layout: str) -> None:
    """Raises ``ValueError`` naming ``name`` and its shape unless it has ``dims`` dimensions (``layout`` says which)."""
    if tensor.dim() != dims:
        raise ValueError(f"{op_name}: {name} has shape {tuple(tensor.shape)}; expected {layout}")
