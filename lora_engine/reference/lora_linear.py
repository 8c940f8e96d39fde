"""Pure-PyTorch LoRA linear: the oracle for the Triton kernel and the CPU production path.

``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with W frozen. Autograd saves the input once, the small
``[N, r]`` product ``drop(x) Aᵀ`` and the dropout seed; the dropout mask is regenerated in backward, so no
dropped copy of the input is ever kept.
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


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``ops.lora_linear`` in PyTorch; see its docstring for the contract.

    Without dropout and with adapters in the input's dtype, plain autograd already saves the input only once
    (no copy) and runs its backward in C++, so the eager ops are used; otherwise ``LoraLinearFunction``, which
    saves the input as it came rather than a dropped or upcast copy.
    """
    if dropout_p == 0.0 and x.dtype == lora_A.dtype:
        delta = F.linear(F.linear(x, lora_A), lora_B) * scaling
        if weight is None:
            return delta
        base_out = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
        return base_out + delta
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)


class LoraLinearFunction(torch.autograd.Function):
    """Autograd of ``lora_linear`` that saves ``x``, the ``[N, r]`` product and the dropout seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
        multiplier = _dropout_multiplier(x.shape, lora_A.dtype, x.device, dropout_p, seed)
        x_lora = _dropped(x.to(lora_A.dtype), multiplier)
        lora_hidden = F.linear(x_lora, lora_A)  # [..., r]
        delta = F.linear(lora_hidden, lora_B) * scaling
        if weight is None:
            out = delta
        else:
            base_weight = weight.T if fan_in_fan_out else weight
            base_out = F.linear(x, base_weight, bias)
            out = (base_out + delta).to(base_out.dtype)
        ctx.save_for_backward(x, weight, lora_A, lora_B, lora_hidden)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.fan_in_fan_out = scaling, dropout_p, seed, fan_in_fan_out
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, lora_hidden = ctx.saved_tensors
        in_features, rank = x.shape[-1], lora_A.shape[0]
        x_flat = x.reshape(-1, in_features)
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
        grad_x = grad_weight = grad_bias = grad_A = grad_B = None

        # The low-rank path runs in the adapter dtype, as in forward.
        grad_delta = grad_flat.to(lora_B.dtype) * ctx.scaling  # [N, out]
        grad_hidden = grad_delta @ lora_B  # [N, r]
        # The mask is regenerated once, for x's shape, and serves both dA and dx.
        multiplier = _dropout_multiplier(x.shape, lora_A.dtype, x.device, ctx.dropout_p, ctx.seed)
        if need_b_lora:
            grad_B = grad_delta.T @ lora_hidden.reshape(-1, rank).to(lora_B.dtype)
        if need_a:
            x_lora = _dropped(x.to(lora_A.dtype), multiplier).reshape(-1, in_features)
            grad_A = grad_hidden.T.to(lora_A.dtype) @ x_lora
        if need_x:
            grad_x = _dropped((grad_hidden.to(lora_A.dtype) @ lora_A).reshape(x.shape), multiplier)
            if weight is not None:
                base_weight = weight.T if ctx.fan_in_fan_out else weight
                grad_x = grad_x + (grad_flat.to(weight.dtype) @ base_weight).reshape(x.shape)
            grad_x = grad_x.to(x.dtype)
        if need_w:
            grad_weight = grad_flat.T.to(weight.dtype) @ x_flat.to(weight.dtype)
            if ctx.fan_in_fan_out:
                grad_weight = grad_weight.T
        if need_b and ctx.has_bias:
            grad_bias = grad_flat.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None
