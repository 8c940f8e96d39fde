"""The ``lora_linear`` op: a frozen linear layer plus one LoRA adapter, in one call.

Contract::

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ

- ``x``: ``[..., in]``, any leading dims and strides; fp32, fp16 or bf16.
- ``weight``: the frozen base weight ``W``, ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``, as in
  transformers' ``Conv1D``), same dtype as ``x``; or ``None``, then only the low-rank term is returned.
- ``bias``: ``[out]`` or ``None``.
- ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``; the low-rank term is computed in their dtype (peft keeps
  adapters in fp32 on half-precision bases) and the sum is returned in the base output's dtype.
- ``scaling``: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rslora).
- ``dropout_p``: inverted dropout on the low-rank input only; pass 0 in eval. The mask is drawn from a seed
  taken from torch's global generator and regenerated in backward. The reference and the Triton kernel draw
  different masks from the same seed (torch's generator vs Philox in the kernel); each is a valid dropout.

Runs ``lora_engine.kernels.lora_linear`` when ``backend.uses_triton`` says so, else ``reference.lora_linear``.

Gradients flow to ``x``, ``lora_A``, ``lora_B``, and to ``bias`` or ``weight`` if they require grad.
Nothing is mutated.
"""

from __future__ import annotations

import torch

from lora_engine import backend
from lora_engine.reference import lora_linear as reference


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``[..., in]`` → ``[..., out]``; see the module docstring."""
    implementation = reference.lora_linear
    if backend.uses_triton("lora_linear", x.device, has_kernel=True):
        # Imported here: the kernel module needs triton, and triton fixes compiled-vs-interpreted at import.
        from lora_engine.kernels import lora_linear as kernel

        implementation = kernel.lora_linear
    seed = _draw_seed() if dropout_p > 0.0 else 0
    return implementation(
        x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, fan_in_fan_out
    )
