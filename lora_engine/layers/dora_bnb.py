"""DoRA on a bitsandbytes 4-bit base (``LoraLinear4bit``); imported only for quantized models."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lora_engine.layers.bnb import LoraLinear4bit
from lora_engine.layers.dora import MAGNITUDE, DoraMixin
from lora_engine.ops.lora_linear import lora_linear


class DoraLinear4bit(DoraMixin, LoraLinear4bit):
    """DoRA on a bitsandbytes 4-bit base: norms and merges read the dequantized weight (fp32 ``[out, in]``),
    a merge quantizes the result again (rounding, as any 4-bit merge)."""

    adapter_containers = ("lora_A", "lora_B", MAGNITUDE)
    plain_class = LoraLinear4bit

    def _write_weight(self, weight: torch.Tensor) -> None:
        warnings.warn(
            "Merge lora module to 4-bit linear may get different generations due to rounding errors.",
            stacklevel=4,
        )
        self._requantize(weight)

    def _fuses_with_base(self, adapter_name: str) -> bool:
        # DoRA rescales the base output itself: it needs the base's result apart from the low-rank term.
        return not self.is_dora(adapter_name)

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if not self.is_dora(name):
            return super()._add_adapter_output(x, result, name)
        lora_A, lora_B = self.lora_factors(name)
        scaling = self.scaling[name]
        scale = self.dora_scale(name)
        bias = self.base_layer.bias
        x = x.to(lora_A.dtype)
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        if dropout_p > 0.0:
            dropped = F.dropout(x, dropout_p, training=True)
            base_dropped = F.linear(dropped, self.dense_weight().to(x.dtype))
            low_rank = lora_linear(dropped, None, None, lora_A, lora_B, scaling)
            return result + (scale - 1) * base_dropped + scale * low_rank
        without_bias = result if bias is None else result - bias
        output = scale * (without_bias + lora_linear(x, None, None, lora_A, lora_B, scaling))
        return output if bias is None else output + bias


DORA_BNB_CLASSES: dict[type, type] = {LoraLinear4bit: DoraLinear4bit}
