"""The base model's own tensors under its original keys, read from or written into a model with adapters.

peft 0.21.2's ``get_base_model_state_dict`` / ``set_base_model_state_dict``: the wrappers' infixes
(``base_layer.``, ``original_module.``) are dropped and every adapter tensor (LoRA factors, ``modules_to_save``
copies) is left out, so the keys are those of the model before ``get_peft_model``.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _original_key_map(model: nn.Module) -> dict[str, str]:
    """In-memory key (relative to the transformers model) → original key, for every base tensor."""
    key_map: dict[str, str] = {}
    pending = [(model, "", "")]
    while pending:
        module, in_memory, original = pending.pop()
        if isinstance(module, LoraLayer):
            pending.append((module.base_layer, in_memory + "base_layer.", original))
            continue
        if isinstance(module, ModulesToSaveWrapper):
            pending.append((module.original_module, in_memory + "original_module.", original))
            continue
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key_map[in_memory + name] = original + name
        for name, child in module.named_children():
            pending.append((child, f"{in_memory}{name}.", f"{original}{name}."))
    return key_map


def _adapted_model(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_base_model"):
        raise TypeError(f"expected a PeftModel, got a {type(model).__name__}")
    return model.get_base_model()


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the ``PeftModel``'s base model under the original keys, without adapter tensors."""
    adapted = _adapted_model(model)
    state = adapted.state_dict()
    return {original: state[key] for key, original in _original_key_map(adapted).items() if key in state}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load ``state_dict`` (original keys) into the ``PeftModel``'s base model; adapters are not touched.

    Returns ``IncompatibleKeys(missing_keys, unexpected_keys)`` (original keys). With ``strict``, either kind of
    key raises ``RuntimeError`` listing them, before anything is loaded.
    """
    adapted = _adapted_model(model)
    state_keys = set(adapted.state_dict())
    to_memory = {original: key for key, original in _original_key_map(adapted).items() if key in state_keys}
    unexpected = [key for key in state_dict if key not in to_memory]
    missing = [key for key in to_memory if key not in state_dict]
    if strict and (missing or unexpected):
        errors = []
        if missing:
            errors.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    adapted.load_state_dict(
        {to_memory[key]: value for key, value in state_dict.items() if key in to_memory}, strict=False
    )
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
