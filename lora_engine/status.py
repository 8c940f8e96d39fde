"""``get_layer_status`` / ``get_model_status``: peft 0.21.2's report of every adapter layer and of the whole model.

The dataclasses have peft's fields, in peft's order, with peft's values (``module_type`` is the name peft gives
the layer kind, e.g. ``"lora.Linear"``), so code written against peft's report reads ours unchanged. Nothing is
mutated. ``"irregular"`` marks a value that differs between layers, as in peft.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper
from lora_engine.tuner import LoraModel

Irregular = Literal["irregular"]

# peft's names for the layer kinds (its classes' ``repr`` prefixes), keyed by our class names.
_PEFT_MODULE_TYPE = {
    "LoraLinear": "lora.Linear",
    "LoraEmbedding": "lora.Embedding",
    "LoraLinear4bit": "lora.Linear4bit",
    "LoraLinear8bit": "lora.Linear8bitLt",
    "ModulesToSaveWrapper": "ModulesToSaveWrapper",
}
_QUANTIZATION_BACKEND = {"LoraLinear4bit": "bnb 4bit", "LoraLinear8bit": "bnb 8bit"}


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_none(values) -> bool | Irregular:
    values = list(values)
    if all(value is True for value in values):
        return True
    if all(value is False for value in values):
        return False
    return "irregular"


def _adapter_parameters(module: LoraLayer | ModulesToSaveWrapper) -> dict[str, list[torch.Tensor]]:
    if isinstance(module, ModulesToSaveWrapper):
        return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}
    return {name: module.adapter_parameters(name) for name in module.adapter_names}


def _layer_status(name: str, module: LoraLayer | ModulesToSaveWrapper) -> TunerLayerStatus:
    parameters = _adapter_parameters(module)
    if isinstance(module, ModulesToSaveWrapper):
        active = [module.active_adapter] if module.active_adapter is not None else []
        merged: list[str] = []
    else:
        active, merged = list(module.active_adapters), list(module.merged_adapters)
    class_name = type(module).__name__
    return TunerLayerStatus(
        name=name,
        module_type=_PEFT_MODULE_TYPE.get(class_name, class_name),
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={
            key: _all_or_none(p.requires_grad for p in params) for key, params in parameters.items()
        },
        available_adapters=sorted(module.adapter_names),
        devices={key: sorted({p.device.type for p in params}) for key, params in parameters.items()},
        quantization_backend=_QUANTIZATION_BACKEND.get(class_name),
    )


def _tuner_of(model: nn.Module) -> nn.Module:
    """What peft walks: a ``PeftModel``'s ``LoraModel`` (names start with ``model.``), else the model itself."""
    base_model = model._modules.get("base_model")
    return base_model if isinstance(base_model, LoraModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per LoRA layer and ``modules_to_save`` wrapper of ``model``, in module order.

    ``model`` is a ``PeftModel`` or a model with adapters injected (``inject_adapter_in_model``). Raises
    ``ValueError`` when it holds no adapter layer.
    """
    statuses = [
        _layer_status(name, module)
        for name, module in _tuner_of(model).named_modules()
        if isinstance(module, LoraLayer | ModulesToSaveWrapper)
    ]
    if not statuses:
        raise ValueError(
            f"No adapter layers found in the {type(model).__name__}; please ensure that it is a PeftModel or that "
            "adapters were injected into it (inject_adapter_in_model)"
        )
    return statuses


def _merged_adapters(statuses: list[TunerLayerStatus]) -> list[str] | Irregular:
    # An adapter merged in one layer but held unmerged by another leaves the model inconsistent.
    merged_anywhere = set().union(*(status.merged_adapters for status in statuses))
    for status in statuses:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged_anywhere:
            return "irregular"
    return sorted(merged_anywhere)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts of ``model``, counting each parameter once.

    A bitsandbytes 4-bit weight packs two values per byte of its storage dtype, so it counts
    ``numel · 2 · itemsize`` logical parameters, as in peft.
    """
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":  # by name: bitsandbytes is not imported for dense models
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of ``get_layer_status(model)``, as peft computes it (parameter counts by
    ``count_parameters``). Raises ``ValueError`` when the model holds no adapter layer."""
    statuses = get_layer_status(model)
    trainable, total = count_parameters(model)
    if _tuner_of(model) is not model:  # a PeftModel
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(model.base_model).__name__
        peft_types = {name: "LORA" for name in model.peft_config}
    else:
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_model_type, peft_types = "None", {}
    enabled = {status.enabled for status in statuses}
    active = {tuple(status.active_adapters) for status in statuses}
    requires_grad, devices = collections.defaultdict(list), collections.defaultdict(set)
    for status in statuses:
        for key, value in status.requires_grad.items():
            requires_grad[key].append(value)
        for key, value in status.devices.items():
            devices[key].update(value)
    backends = {status.quantization_backend for status in statuses}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(statuses),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged_adapters(statuses),
        requires_grad={key: _all_or_none(values) for key, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(status.available_adapters for status in statuses))),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
