"""The weight-derived LoRA initialisations of peft 0.21 for dense layers: PiSSA, OLoRA and orthogonal.

Each returns new factors ``A [r, in]``, ``B [out, r]`` (and, for PiSSA and OLoRA, the residual base weight
``W − s·B A`` that the caller writes back), with peft's arithmetic step for step, so the same base weight (and,
for the random ones, the same seed of torch's global generator) gives bit-identical factors.

- ``pissa``: ``W = V S Uᵀ`` (full SVD of ``W`` as ``[out, in]`` in fp32); ``B = V_r √(S_r/s)``,
  ``A = √(S_r/s) Uᵀ_r``. ``pissa_niter_K``: the same from ``torch.svd_lowrank(W, r, niter=K)`` (random).
- ``olora``: ``Q R = W`` (QR of the weight as stored, fp32); ``B = Q[:, :r]``, ``A = R[:r]``.
- ``orthogonal``: peft's recipe from one random ``r × r`` QR (``r`` must be even); the base is unchanged.
"""

from __future__ import annotations

import math
import re

import torch

PISSA = re.compile(r"pissa(?:_niter_(?P<niter>\d+))?")
WEIGHT_DERIVED_INITS = ("pissa", "olora", "orthogonal")  # and "pissa_niter_<K>"


def init_default_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, r: int, init_lora_weights) -> None:
    """peft's default factors, written in place: ``lora_A`` Gaussian with std ``1/r`` for ``"gaussian"``, else
    Kaiming-uniform with ``a=√5`` (``nn.Linear``'s init); ``lora_B`` zeros, so a new adapter starts as a no-op."""
    if init_lora_weights == "gaussian":
        torch.nn.init.normal_(lora_A, std=1 / r)
    else:
        torch.nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    torch.nn.init.zeros_(lora_B)


def is_weight_derived(init_lora_weights) -> bool:
    """Whether ``init_lora_weights`` names one of this module's initialisations, or CorDA (``corda_init``)."""
    return isinstance(init_lora_weights, str) and (
        init_lora_weights in ("olora", "orthogonal", "corda")
        or PISSA.fullmatch(init_lora_weights) is not None
    )


def _float_weight(weight: torch.Tensor, init: str) -> torch.Tensor:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, got {weight.dtype}; "
            "initialise on an unquantized base"
        )
    return weight.detach().to(torch.float32)


@torch.no_grad()
def pissa(
    weight: torch.Tensor, r: int, scaling: float, init: str, fan_in_fan_out: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual weight in weight's dtype and layout)`` for ``init`` ``"pissa"`` or ``"pissa_niter_K"``."""
    matrix = _float_weight(weight, init)
    matrix = matrix.T if fan_in_fan_out else matrix
    niter = PISSA.fullmatch(init)["niter"]
    if niter is None:
        left, singular, right_h = torch.linalg.svd(matrix, full_matrices=False)
        left, singular, right_h = left[:, :r], singular[:r], right_h[:r]
    else:
        left, singular, right = torch.svd_lowrank(matrix, r, niter=int(niter))
        right_h = right.t()
    singular = singular / scaling
    lora_A = torch.diag(torch.sqrt(singular)) @ right_h
    lora_B = left @ torch.diag(torch.sqrt(singular))
    residual = (matrix - scaling * lora_B @ lora_A).to(weight.dtype)
    return lora_A, lora_B, residual.T if fan_in_fan_out else residual


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual weight in weight's dtype)``; the QR is of the weight as stored, as in peft."""
    matrix = _float_weight(weight, "olora")
    q, upper = torch.linalg.qr(matrix)
    lora_A, lora_B = upper[:r].contiguous(), q[:, :r].contiguous()
    residual = (matrix - scaling * lora_B @ lora_A).to(weight.dtype)
    return lora_A, lora_B, residual


@torch.no_grad()
def orthogonal(
    in_features: int, out_features: int, r: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in ``dtype``, drawn from torch's global generator in peft's order. ``ValueError`` for odd r."""
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    lora_A = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    lora_B = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return lora_A.contiguous().to(dtype), lora_B.contiguous().to(dtype)
