"""CorDA's factors for one dense layer (peft 0.21's ``init_lora_weights="corda"``), from the decomposition
``preprocess_corda`` left on the base layer as ``base_layer.eigens``.

``eigens`` holds ``U [out, r]``, ``S [r]`` and ``V [in, r]`` with ``U diag(S) Vᵀ`` the chosen ``r`` components
of ``W C · C⁻¹`` (``C`` the damped input covariance). ``A = √(S/s) Vᵀ``, ``B = U √(S/s)``, and the base weight
becomes the residual ``W − s·B A``, so the layer's output is unchanged at the start (as with PiSSA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIX_THE_CACHE = (
    "Please make sure the `lora_config` and `model` argument of `preprocess_corda` is consistent with "
    "`get_peft_model`. If you're using cache in `preprocess_corda`, please make sure the cache is built with the "
    "same model and LoRA rank."
)


@dataclass
class CordaEigens:
    """The cropped decomposition of one layer: ``S_WC [r]``, ``U_WC [out, r]``, ``V_WC [in, r]``."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


@torch.no_grad()
def corda_factors(
    weight: torch.Tensor, eigens: CordaEigens, r: int, scaling: float, fan_in_fan_out: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r], residual weight in weight's dtype and layout)``; ``eigens`` is not mutated.

    ``TypeError`` for a base weight that is not float32/float16/bfloat16 (a quantized one); ``ValueError`` for
    non-finite eigens or shapes that do not fit the layer and ``r``.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"init_lora_weights='corda' needs a float32, float16 or bfloat16 base weight, got {weight.dtype}. "
            "Please initialize CorDA under float32, float16, or bfloat16. "
            "Subsequently, re-quantize the residual model to help minimize quantization errors."
        )
    matrix = weight.detach().to(torch.float32)
    out_dim, in_dim = matrix.shape[::-1] if fan_in_fan_out else matrix.shape
    left, singular, right = eigens.U_WC, eigens.S_WC, eigens.V_WC
    for name, tensor in (("S", singular), ("U", left), ("V", right)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Invalid value found in matrix {name} of the CorDA eigens (NaN or infinity).")
    expected = {"U": (out_dim, r), "S": (r,), "V": (in_dim, r)}
    for name, tensor in (("U", left), ("S", singular), ("V", right)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"Matrix {name} size mismatch: {tuple(tensor.shape)} vs. {expected[name]}. {FIX_THE_CACHE}"
            )
    singular = singular / scaling
    lora_A = right.t().mul(singular.sqrt().view(-1, 1)).contiguous()
    lora_B = left.mul(singular.sqrt()).contiguous()
    delta = scaling * lora_B @ lora_A
    residual = matrix - (delta.t() if fan_in_fan_out else delta)
    return lora_A, lora_B, residual.to(weight.dtype)
