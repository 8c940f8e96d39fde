"""Exporting a LoRA model on a bitsandbytes base as a plain dense transformers model.

``merge_and_unload_dequantized`` replaces every bitsandbytes layer by an ``nn.Linear`` holding its dequantized
weight plus the merged LoRA deltas (``layers.bnb``'s ``to_dense`` and ``dequantize_bnb_linear``), then clears the
model's quantization markers. It lives beside the 4-bit and 8-bit wrappers, not in ``tuner``, so a change to
quantized layers never touches the generic tuner; ``LoraModel.merge_and_unload_dequantized`` only calls it.

Imports bitsandbytes (through ``layers.bnb``), so it is imported only when a quantized model is exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.bnb import dequantize_bnb_linear, is_bnb_linear
from lora_engine.module_tree import replace_submodule


class MergeableModel(Protocol):
    """What the export uses of a ``LoraModel``."""

    model: nn.Module

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]: ...

    def check_merges_finite(self, adapter_names: list[str] | None) -> None: ...

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module: ...


def merge_and_unload_dequantized(
    lora_model: MergeableModel,
    dtype: torch.dtype | None = None,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    """Export a dense model: every bitsandbytes layer becomes an ``nn.Linear`` holding its dequantized weight
    plus the merged LoRA deltas of ``adapter_names`` (default: the active ones), computed in fp32 and cast once
    to ``dtype`` (default: the dtype of the model's unquantized weights, so the exported layers fit the rest of
    the model). Unlike ``merge_and_unload`` on a 4-bit base, nothing is requantized, so no rounding error is
    added. Other LoRA layers are merged and unloaded as ``merge_and_unload`` does.

    Mutates ``lora_model.model`` in place and returns it, no longer quantized. With ``safe_merge`` a broken
    adapter raises ``ValueError`` before any layer is replaced.
    """
    dtype = dtype or _dense_dtype(lora_model.model)
    if safe_merge:
        lora_model.check_merges_finite(adapter_names)
    for module_name, layer in list(lora_model.lora_layers()):
        if is_bnb_linear(layer.base_layer):
            names = [name for name in (adapter_names or layer.active_adapters) if name in layer.r]
            replace_submodule(lora_model.model, module_name, layer.to_dense(names, dtype))
    model = lora_model.merge_and_unload(adapter_names=adapter_names)  # already checked when safe_merge
    for module_name, module in list(model.named_modules()):
        if is_bnb_linear(module):
            replace_submodule(model, module_name, dequantize_bnb_linear(module, dtype))
    _forget_quantization(model)
    return model


def _dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantized floating-point weights (its embeddings, norms, head)."""
    for param in model.parameters():
        if param.dtype.is_floating_point and type(param) is nn.Parameter:
            return param.dtype
    return torch.float32


def _forget_quantization(model: nn.Module) -> None:
    """Mark a transformers model whose quantized layers were all made dense as a plain model again: no
    quantizer, no quantization config, and no load-time bitsandbytes conversions for ``save_pretrained`` to
    reverse, so ``.to(dtype)`` and ``save_pretrained`` treat it as a model built in full precision."""
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if flag in model.__dict__:
            setattr(model, flag, False)
    for attribute in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        model.__dict__.pop(attribute, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
