"""The save and load walks of a ``PeftModel``: which adapter goes to which folder, what its written config says,
and loading one folder into a named adapter.

The files themselves (key names, atomic writes, safe reads) are ``serialization``'s; ``PeftModel.save_pretrained``
and ``PeftModel.load_adapter`` are these functions. They take the ``PeftModel`` as an argument and do not import
``peft_model`` (which imports them).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_engine.config import PeftConfig
from lora_engine.init_conversion import converted_config, converted_weights
from lora_engine.integrations.trainer import is_trainer_checkpoint_save, save_trainable_weights
from lora_engine.peft_format import SAVED_PREFIX
from lora_engine.serialization import (
    adapter_folder,
    get_peft_model_state_dict,
    load_adapter_weights,
    save_adapter_weights,
    set_peft_model_state_dict,
)


def save_adapters(
    peft_model: nn.Module,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None,
    safe_serialization: bool,
    save_embedding_layers: bool | str,
    is_main_process: bool,
    save_kwargs: dict,
    initial_folder: str | os.PathLike | None = None,
) -> None:
    """``PeftModel.save_pretrained``'s walk (see its docstring), after its argument checks: every name is
    checked, then the model card is written or updated, then each selected adapter is written to its folder;
    ``save_kwargs`` are the extra keywords the caller got (``state_dict``). With ``initial_folder`` each adapter
    is converted to plain LoRA first (``init_conversion``)."""
    peft_config = peft_model.peft_config
    names = list(peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} not found; available adapters: {sorted(peft_config)}")
    folders = {name: adapter_folder(save_directory, name) for name in names}
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    peft_model.create_or_update_model_card(save_directory)
    base_model = peft_model.get_base_model()
    for name, folder in folders.items():
        weights = get_peft_model_state_dict(
            peft_model,
            state_dict=save_kwargs.get("state_dict"),
            adapter_name=name,
            save_embedding_layers=save_embedding_layers,
        )
        config = copy.deepcopy(peft_config[name])
        if initial_folder is not None:  # PiSSA / OLoRA saved as plain LoRA for the original base
            weights = converted_weights(peft_model, name, weights, initial_folder)
            config = converted_config(config)
        save_adapter_weights(weights, str(folder), safe_serialization=safe_serialization)
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
        if config.task_type is None:
            base_class = type(base_model)
            config.auto_mapping = {
                "base_model_class": base_class.__name__,
                "parent_library": base_class.__module__,
            }
        config.save_pretrained(folder)
    if is_trainer_checkpoint_save(save_directory, save_kwargs):
        save_trainable_weights(peft_model, save_directory, save_kwargs["state_dict"])


def load_adapter_folder(
    peft_model: nn.Module,
    folder: Path,
    adapter_name: str,
    is_trainable: bool,
    torch_device: str | torch.device | None,
    autocast_adapter_dtype: bool,
    key_mapping: dict[str, str] | None,
    ignore_mismatched_sizes: bool,
):
    """``PeftModel.load_adapter``'s walk (see its docstring) for the adapter folder ``folder``; returns
    ``(missing, unexpected)`` keys. A new ``adapter_name`` is added through ``peft_model.add_adapter``, which
    checks the name before anything is created."""
    if adapter_name not in peft_model.peft_config:
        config = PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        peft_model.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
    if torch_device is None:
        torch_device = next(peft_model.parameters()).device
    weights = load_adapter_weights(folder, device=torch_device)
    if key_mapping:
        weights = _apply_key_mapping(weights, key_mapping)
    result = set_peft_model_state_dict(
        peft_model, weights, adapter_name=adapter_name, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
    if result.missing_keys:
        warnings.warn(
            f"Found missing adapter keys while loading the checkpoint {str(folder)!r}: {result.missing_keys}",
            stacklevel=3,
        )
    if result.unexpected_keys:
        warnings.warn(
            f"Keys in {str(folder)!r} that match no module of adapter {adapter_name!r}: {result.unexpected_keys}",
            stacklevel=3,
        )
    lora_model = peft_model.base_model
    if not is_trainable:
        _freeze_for_inference(peft_model, adapter_name)
    elif adapter_name in lora_model.active_adapters:
        lora_model.set_adapter(lora_model.active_adapter)
    return result


def _freeze_for_inference(peft_model: nn.Module, adapter_name: str) -> None:
    """After an inference-mode load, as peft: no adapter parameter trainable, the model in eval mode.

    Only adapters that can be trainable are touched (the active ones, and ``adapter_name`` if its weights were
    reloaded while active), and the whole tree is switched to eval only if its root is in training mode;
    otherwise only ``adapter_name``'s new modules are. So a load stays flat in the number of adapters loaded.
    """
    lora_model = peft_model.base_model
    names = {*lora_model.active_adapters, adapter_name}
    for _, wrapper in lora_model.named_adapter_wrappers():
        wrapper.wrapped_module().requires_grad_(False)
        for name in names:
            for param in wrapper.adapter_parameters(name):
                param.requires_grad_(False)
        if not peft_model.training:
            for module in wrapper.adapter_modules(adapter_name):
                module.eval()
    if peft_model.training:
        peft_model.eval()


def _apply_key_mapping(
    weights: dict[str, torch.Tensor], key_mapping: dict[str, str]
) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping``: regex renames applied to keys without the ``base_model.model.`` prefix."""
    renamed = {}
    for key, value in weights.items():
        bare = key.removeprefix(SAVED_PREFIX)
        for pattern, replacement in key_mapping.items():
            bare, count = re.subn(pattern, replacement, bare)
            if count:
                break
        renamed[SAVED_PREFIX + bare] = value
    return renamed


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    subfolder: str | None = None,
) -> dict[str, torch.Tensor]:
    """peft's ``load_peft_weights``: the saved tensors of the adapter in the local folder ``model_id``
    (``/subfolder``), keys as saved. ``key_mapping`` renames keys as ``PeftModel.from_pretrained`` does."""
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    weights = load_adapter_weights(str(folder), device=device)
    return _apply_key_mapping(weights, key_mapping) if key_mapping else weights
