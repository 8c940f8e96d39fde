"""Pure-PyTorch math of ``ops.lora_linear``: the oracle for the Triton kernels and the CPU production path.

``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with W frozen. This module holds the math only; the contract checks, the
dispatch and the ``torch.autograd.Function`` (which saves x once, the small ``drop(x) Aᵀ`` product and the dropout
seed, and computes the weight and bias gradients) live in ``ops.lora_linear``:

- ``eager_lora_linear``: plain autograd, for the case it already handles best (no dropout, adapters in x's dtype);
- ``forward`` and ``backward``: what the autograd Function runs on this backend otherwise. The dropout mask is
  regenerated in backward from the seed, so no dropped copy of the input is ever kept.

Operands as ``ops.lora_linear`` documents and checks them (any float dtype torch computes in, float64 included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask of inverted dropout with drop probability ``p``, a function of ``seed`` only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= p


def _dropout_multiplier(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float, seed: int
) -> torch.Tensor | None:
    """Inverted dropout's per-element multiplier (0, or ``1 / (1 - p)``), or None when ``p == 0``."""
    if p == 0.0:
        return None
    return dropout_keep_mask(shape, p, seed, device).to(dtype) * (1.0 / (1.0 - p))


def _dropped(x: torch.Tensor, multiplier: torch.Tensor | None) -> torch.Tensor:
    return x if multiplier is None else x * multiplier


def eager_lora_linear(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out):
    """``x [..., in]`` → ``[..., out]`` without dropout, as plain differentiable torch ops.

    With adapters in the input's dtype, plain autograd already saves the input only once (no copy) and runs its
    backward in C++, which beats the Python ``forward``/``backward`` pair below.
    """
    delta = F.linear(F.linear(x, lora_A), lora_B) * scaling
    if weight is None:
        return delta
    base_out = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    return base_out + delta


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``(y [..., out], x_lora_A [..., r])``: the output, in the base output's dtype (the adapters' without a
    weight), and the product ``drop(x) Aᵀ`` in the adapters' dtype, which ``backward`` takes back."""
    multiplier = _dropout_multiplier(x.shape, lora_A.dtype, x.device, dropout_p, seed)
    x_lora = _dropped(x.to(lora_A.dtype), multiplier)
    x_lora_A = F.linear(x_lora, lora_A)  # [..., r]
    delta = F.linear(x_lora_A, lora_B) * scaling
    if weight is None:
        return delta, x_lora_A
    base_weight = weight.T if fan_in_fan_out else weight
    base_out = F.linear(x, base_weight, bias)
    return (base_out + delta).to(base_out.dtype), x_lora_A


def backward(grad_out, x, weight, lora_A, lora_B, x_lora_A, scaling, dropout_p, seed, fan_in_fan_out, needs):
    """``(dx, dA, dB)`` for ``dy = grad_out [..., out]``, each None unless ``needs`` (three bools) asks for it.

    ``dx`` includes the base term ``dy W``; ``dx`` is in x's dtype, ``dA``/``dB`` in the adapters'. The weight and
    bias gradients are not computed here: ``ops.lora_linear`` computes them the same way for every backend.
    """
    need_x, need_A, need_B = needs
    in_features, rank = x.shape[-1], lora_A.shape[0]
    grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_A = grad_B = None

    # The low-rank path runs in the adapter dtype, as in forward.
    grad_delta = grad_flat.to(lora_B.dtype) * scaling  # [N, out]
    grad_x_lora_A = grad_delta @ lora_B  # [N, r]
    # The mask is regenerated once, for x's shape, and serves both dA and dx.
    multiplier = _dropout_multiplier(x.shape, lora_A.dtype, x.device, dropout_p, seed)
    if need_B:
        grad_B = grad_delta.T @ x_lora_A.reshape(-1, rank).to(lora_B.dtype)
    if need_A:
        x_lora = _dropped(x.to(lora_A.dtype), multiplier).reshape(-1, in_features)
        grad_A = grad_x_lora_A.T.to(lora_A.dtype) @ x_lora
    if need_x:
        grad_x = _dropped((grad_x_lora_A.to(lora_A.dtype) @ lora_A).reshape(x.shape), multiplier)
        if weight is not None:
            base_weight = weight.T if fan_in_fan_out else weight
            grad_x = grad_x + (grad_flat.to(weight.dtype) @ base_weight).reshape(x.shape)
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_A, grad_B
