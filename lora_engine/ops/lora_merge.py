"""The ``lora_merge`` op: add or subtract a LoRA delta into a dense base weight, in place.

Contract::

    W ← W ± s · B A          (W ← W ± s · (B A)ᵀ when ``fan_in_fan_out``)

- ``weight``: ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``); fp32, fp16 or bf16. **Mutated in place.**
- ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``; the delta is computed in fp32, then cast to
  ``weight.dtype`` and added.
- ``subtract``: unmerge instead of merge.
- ``check_finite``: check the merged weight for NaN/Inf before any write; on failure raise
  ``FloatingPointError`` and leave ``weight`` untouched (peft's ``safe_merge``).

Runs ``lora_engine.kernels.lora_merge`` when ``backend.uses_triton`` says so, else ``reference.lora_merge``.
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.reference.lora_merge import lora_delta, lora_merge_

__all__ = ["lora_delta", "lora_merge"]


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
    implementation = lora_merge_
    if backend.uses_triton("lora_merge", weight.device, has_kernel=True):
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
