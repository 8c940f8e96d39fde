"""The ``lora_merge`` op: add or subtract a LoRA delta into a dense base weight, in place.

Contract::

    W ← W ± s · B A          (W ← W ± s · (B A)ᵀ when ``fan_in_fan_out``)

- ``weight``: ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``); fp32, fp16 or bf16. **Mutated in place.**
- ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``; the delta is computed in fp32, then cast to
  ``weight.dtype`` and added.
- ``subtract``: unmerge instead of merge.
- ``check_finite``: check the merged weight for NaN/Inf before any write; on failure raise
  ``FloatingPointError`` and leave ``weight`` untouched (peft's ``safe_merge``).

Raises ``ValueError`` naming the operands when their shapes do not fit ``W [out, in] = B [out, r] A [r, in]`` or
they are on different devices, on every backend.

Runs ``lora_engine.kernels.lora_merge`` when ``backend.uses_triton`` says so, else ``reference.lora_merge``.
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.ops._checks import check_dims, check_same_device
from lora_engine.reference.lora_merge import lora_delta, lora_merge_

__all__ = ["check_operands", "lora_delta", "lora_merge"]

OP = "lora_merge"


def check_operands(weight, lora_A, lora_B, fan_in_fan_out: bool) -> None:
    """The contract of the module docstring on shapes and devices; raises what it says."""
    check_same_device(OP, {"weight": weight, "lora_A": lora_A, "lora_B": lora_B})
    check_dims(OP, "lora_A", lora_A, 2, "[r, in]")
    check_dims(OP, "lora_B", lora_B, 2, "[out, r]")
    check_dims(OP, "weight", weight, 2, "[in, out]" if fan_in_fan_out else "[out, in]")
    rank, in_features = lora_A.shape
    out_features = lora_B.shape[0]
    logical = weight.T if fan_in_fan_out else weight
    if tuple(logical.shape) != (out_features, in_features) or lora_B.shape[1] != rank:
        raise ValueError(
            f"{OP}: weight {tuple(weight.shape)} (fan_in_fan_out={fan_in_fan_out}), lora_A {tuple(lora_A.shape)} "
            f"and lora_B {tuple(lora_B.shape)} do not fit W [out, in] = B [out, r] A [r, in]"
        )


def lora_merge(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    subtract: bool = False,
    check_finite: bool = False,
) -> None:
    """In-place ``weight ± s · B A``; see the module docstring."""
    check_operands(weight, lora_A, lora_B, fan_in_fan_out)
    implementation = lora_merge_
    if backend.uses_triton(OP, weight.device):
        # Imported here: the kernel module needs triton, and triton fixes compiled-vs-interpreted at import.
        from lora_engine.kernels import lora_merge as kernel

        implementation = kernel.lora_merge_
    implementation(
        weight,
        lora_A,
        lora_B,
        scaling,
        fan_in_fan_out=fan_in_fan_out,
        subtract=subtract,
        check_finite=check_finite,
    )
