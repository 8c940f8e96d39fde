"""LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: ``y = conv(x, W) + b + s · B(A(drop(x)))``.

As in peft 0.21, ``lora_A[a]`` is a convolution with the base layer's kernel, stride and padding, ``in → r``
channels and no groups (weight ``[r, in, *kernel]``), and ``lora_B[a]`` a 1×…×1 convolution ``r → out`` with the
base layer's groups (weight ``[out, r / groups, 1, …]``), so state-dict keys and shapes are peft's. The delta
``s · B A`` is a weight shaped like the base weight: ``ΔW[o, i, k…] = s · Σ_j B[o, j] A[j, i, k…]``.

Beyond peft: ``lora_A`` also takes the base layer's dilation and padding mode. peft leaves them at their defaults,
so with a dilated base its ``lora_A`` output has another spatial size and the forward fails, and with a non-zero
padding mode its merged weight no longer equals its unmerged forward; here both hold. Refused as in peft: a rank
that ``groups`` does not divide, and merging when ``groups > 1`` (the low-rank update mixes every input channel,
which a grouped weight cannot hold).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.inits import init_default_factors

CONV_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LoraConv(LoraLayer):
    """LoRA wrapper of an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (or a subclass of one)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.conv_kind = _CONV_BY_DIMS[base_layer.weight.dim() - 2]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, r: int, *args, **kwargs) -> None:
        """``LoraLayer.add_adapter``; raises ``ValueError`` when ``r`` is not a multiple of the base's groups."""
        groups = self.base_layer.groups
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(self.base_layer).__name__} with groups={groups} and rank {r}: the rank must be "
                f"divisible by groups (lora_B is grouped like the base layer); choose r as a multiple of {groups} "
                "or do not target this layer"
            )
        if groups > 1:
            warnings.warn(
                f"LoRA adapter {adapter_name!r} added to a {type(self.base_layer).__name__} with groups={groups}: "
                "it can be trained and saved, but not merged.",
                stacklevel=3,
            )
        super().add_adapter(adapter_name, r, *args, **kwargs)

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        base = self.base_layer
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = self.conv_kind(
            self.in_features,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            dilation=base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[adapter_name] = self.conv_kind(
            r, self.out_features, ones, ones, groups=base.groups, bias=self.lora_bias[adapter_name]
        )
        lora_A, lora_B = self.lora_factors(adapter_name)
        if init_lora_weights is False:  # keep the conv init: the adapter is not a no-op (for tests)
            return
        init_default_factors(lora_A, lora_B, r, init_lora_weights)
        if self.lora_bias[adapter_name]:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in, *kernel], B [out, r / groups, 1, …])`` of ``adapter_name``, as stored."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s · B(A(drop(x)))`` in the adapter's dtype."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_A.weight.dtype)
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        if dropout_p > 0.0:
            x = F.dropout(x, dropout_p, training=True)
        return lora_B(lora_A(x)) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [N, in, *spatial]`` → ``[N, out, *spatial']`` in the base layer's output dtype."""
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        result = self.base_layer(x, *args, **kwargs)
        summed = result
        for name in active:
            summed = self._add_adapter_output(x, summed, name)
        return summed.to(result.dtype)

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the output so far) plus adapter ``name``'s term."""
        return result + self._low_rank(x, name)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each sample of ``x`` gets the adapter ``self.routing`` assigns it: one low-rank pass per adapter over
        its own samples."""
        result = self.base_layer(x, *args, **kwargs)
        held = [name for name in self.routing.names if name in self.r]
        if not held:
            return result
        self.routing.check_batch(x.shape[0], type(self.base_layer).__name__)
        for name, rows in self.routing.rows_by_adapter(held, x.device):
            result = result.index_add(0, rows, self._low_rank(x[rows], name).to(result.dtype))
        return result

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` shaped and typed like the base weight (computed in fp32). Raises ``NotImplementedError``
        when the base has ``groups > 1``: no weight of the base's shape holds that update."""
        self._check_mergeable()
        lora_A, lora_B = self.lora_factors(adapter_name)
        rank = lora_A.shape[0]
        delta = lora_B.float().reshape(self.out_features, rank) @ lora_A.float().reshape(rank, -1)
        weight = self.base_layer.weight
        return (delta * self.scaling[adapter_name]).reshape(weight.shape).to(weight.dtype)

    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        delta = self.get_delta_weight(adapter_name)
        new_bias = self._merged_bias(adapter_name, subtract)
        weight = self.base_layer.weight.data
        weight.sub_(delta) if subtract else weight.add_(delta)
        self._write_bias(new_bias)

    def _check_mergeable(self) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(
                f"Merging is not supported for a {type(self.base_layer).__name__} with groups="
                f"{self.base_layer.groups}: the LoRA update mixes all input channels, which the grouped base weight "
                "cannot hold. Keep the adapter unmerged."
            )
