"""LoRA around a dense linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2, weight ``[in, out]``).

``y = x Wᵀ + b + Σ_active s_a · (drop_a(x) A_aᵀ) B_aᵀ``, with ``A_a [r, in]`` and ``B_a [out, r]`` stored as
``lora_A[a]`` / ``lora_B[a]`` (``nn.Linear`` modules, so state-dict keys match peft's).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.layers.base import LoraLayer
from lora_engine.ops.grouped_lora import grouped_lora
from lora_engine.ops.lora_linear import lora_linear


class LoraLinear(LoraLayer):
    """LoRA wrapper of an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.delta_is_transposed = self.fan_in_fan_out
        in_features, out_features = base_layer.weight.shape[::-1]
        if self.fan_in_fan_out:
            in_features, out_features = out_features, in_features
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        lora_A, lora_B = self.lora_factors(adapter_name)
        if init_lora_weights is False:  # keep nn.Linear's init: the adapter is not a no-op (for tests)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [..., in]`` → ``[..., out]`` in the base layer's dtype."""
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        result = None
        for name in active:
            lora_A, lora_B = self.lora_factors(name)
            dropout_p = self.lora_dropout_p[name] if self.training else 0.0
            if result is None:
                result = lora_linear(
                    x, weight, bias, lora_A, lora_B, self.scaling[name], dropout_p, self.fan_in_fan_out
                )
            else:
                delta = lora_linear(x, None, None, lora_A, lora_B, self.scaling[name], dropout_p)
                result = (result + delta).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of ``x [B, ..., in]`` gets the adapter ``self.routing`` assigns it, in one grouped call."""
        result = self.base_layer(x, *args, **kwargs)
        stacked = self.stacked_factors(self.routing, x.device)
        if stacked is None:
            return result
        self.routing.check_batch(x.shape[0], type(self.base_layer).__name__)
        delta = grouped_lora(x, *stacked)
        if torch.is_grad_enabled():
            return (result + delta).to(result.dtype)
        # Without autograd (inference, generate), added into the base output, which this call owns: one
        # [B, ..., out] tensor fewer at the layer's peak. add_ sums in the promoted dtype and rounds once into
        # result's dtype, as the out-of-place sum and cast above do.
        return result.add_(delta)
