"""The save and load walks of a ``PeftModel``: which adapter goes to which folder, what its written config says,
and loading one folder into a named adapter.

The files themselves (key names, all-or-nothing writes, checked reads) are ``serialization``'s and
``file_checks``'; loads are transactions (``adapter_loading``); ``PeftModel.save_pretrained``
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

from lora_engine.adapter_loading import ModelSnapshot, check_ranks, read_adapter_config, read_adapter_weights
from lora_engine.file_checks import AdapterFileError, bound_config_digest
from lora_engine.init_conversion import converted_config, converted_weights
from lora_engine.peft_format import CONFIG_NAME, SAFETENSORS_NAME, SAVED_PREFIX
from lora_engine.serialization import (
    adapter_folder,
    check_adapter_name,
    get_peft_model_state_dict,
    load_adapter_weights,
    save_adapter_files,
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
    names = _selected_names(selected_adapters, peft_config)
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
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
        if config.task_type is None:
            base_class = type(base_model)
            config.auto_mapping = {
                "base_model_class": base_class.__name__,
                "parent_library": base_class.__module__,
            }
        save_adapter_files(folder, config.to_dict(), weights, safe_serialization=safe_serialization)


def load_adapter_folder(
    peft_model: nn.Module,
    folder: Path,
    adapter_name: str,
    is_trainable: bool,
    torch_device: str | torch.device | None,
    autocast_adapter_dtype: bool,
    key_mapping: dict[str, str] | None,
    ignore_mismatched_sizes: bool,
    replace_existing: bool = False,
    allow_non_finite: bool = False,
):
    """``PeftModel.load_adapter``'s walk (see its docstring) for the adapter folder ``folder``; returns
    ``(missing, unexpected)`` keys. Everything that needs no change to the model is checked first
    (``adapter_loading``); if anything raises after that, the model is put back exactly as it was."""
    check_adapter_name(adapter_name)
    config = read_adapter_config(folder)
    existing = peft_model.peft_config.get(adapter_name)
    if existing is not None and not replace_existing and not _same_meaning(existing, config):
        raise ValueError(
            f"Adapter {adapter_name!r} already exists with another config than {str(folder)!r} (r, alpha or "
            "targets differ); pass replace_existing=True to replace it, or load it under another name"
        )
    config.inference_mode = not is_trainable
    device = torch_device if torch_device is not None else next(peft_model.parameters()).device
    weights_path, weights = read_adapter_weights(folder, device, allow_non_finite)
    if key_mapping:
        weights = _apply_key_mapping(weights, key_mapping)
    replaced = _detach_adapter(peft_model, adapter_name) if existing is not None else None
    snapshot = ModelSnapshot(peft_model.get_base_model(), peft_model)
    try:
        check_ranks(peft_model.get_base_model(), config, weights, weights_path)
        try:
            peft_model.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        except ValueError as error:
            raise AdapterFileError(folder / CONFIG_NAME, str(error)) from error
        result = copy_weights_in(
            peft_model, folder, adapter_name, weights, is_trainable, ignore_mismatched_sizes
        )
    except BaseException:
        snapshot.restore()
        if replaced is not None:
            _reattach_adapter(peft_model, adapter_name, *replaced)
        raise
    if replaced is not None and replaced[2]:
        peft_model.base_model.set_adapter(replaced[2], inference_mode=not is_trainable)
    return result


def load_into_new_peft_model(
    model_class, model: nn.Module, folder: Path, adapter_name: str, config, is_trainable: bool, options: dict
):
    """``PeftModel.from_pretrained``'s walk: wrap ``model`` in ``model_class`` with the adapter in ``folder``.
    ``options``: ``autocast_adapter_dtype``, ``key_mapping``, ``torch_device``, ``allow_non_finite``,
    ``ignore_mismatched_sizes``. If anything raises, ``model`` is left exactly as it was (no LoRA wrapper)."""
    check_adapter_name(adapter_name)
    device = options.get("torch_device") or next(model.parameters()).device
    _, weights = read_adapter_weights(folder, device, options.get("allow_non_finite", False))
    if options.get("key_mapping"):
        weights = _apply_key_mapping(weights, options["key_mapping"])
    check_ranks(model, config, weights, folder / SAFETENSORS_NAME)
    snapshot = ModelSnapshot(model)
    peft_model = None
    try:
        try:
            peft_model = model_class(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=options.get("autocast_adapter_dtype", True),
            )
        except ValueError as error:
            raise AdapterFileError(folder / CONFIG_NAME, str(error)) from error
        ignore = options.get("ignore_mismatched_sizes", False)
        copy_weights_in(peft_model, folder, adapter_name, weights, is_trainable, ignore)
    except BaseException:
        snapshot.restore(peft_model)
        raise
    return peft_model


def _same_meaning(first, second) -> bool:
    """Whether two configs agree on every field that gives adapter weights their meaning."""
    return bound_config_digest(first.to_dict()) == bound_config_digest(second.to_dict())


def _detach_adapter(peft_model: nn.Module, adapter_name: str):
    """Remove ``adapter_name`` for a replacement; returns what ``_reattach_adapter`` needs to put it back."""
    config = peft_model.peft_config[adapter_name]
    saved = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {key: value.detach().clone() for key, value in saved.items()}
    lora_model = peft_model.base_model
    active = copy.copy(lora_model.active_adapter) if adapter_name in lora_model.active_adapters else None
    flags = (
        {name: param.requires_grad for name, param in peft_model.named_parameters()},
        {name: module.training for name, module in peft_model.named_modules()},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_model.delete_adapter(adapter_name)
    return config, tensors, active, flags


def _reattach_adapter(peft_model: nn.Module, adapter_name: str, config, tensors, active, flags) -> None:
    """Undo ``_detach_adapter`` after a failed replacement, flags included (by name: modules are new)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.base_model.inject_adapter(adapter_name, config)
        set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
        if active is not None:
            peft_model.base_model.set_adapter(active)
    requires_grad, training = flags
    for name, param in peft_model.named_parameters():
        param.requires_grad_(requires_grad.get(name, False))
    for name, module in peft_model.named_modules():
        module.training = training.get(name, module.training)


def copy_weights_in(
    peft_model: nn.Module,
    folder: Path,
    adapter_name: str,
    weights,
    is_trainable: bool,
    ignore_mismatched_sizes: bool,
):
    """Copy the loaded ``weights`` into the injected ``adapter_name``, warn about missing and unexpected keys,
    and freeze (and ``eval()``) unless ``is_trainable``. Errors name the weights file."""
    try:
        result = set_peft_model_state_dict(
            peft_model, weights, adapter_name=adapter_name, ignore_mismatched_sizes=ignore_mismatched_sizes
        )
    except ValueError as error:
        raise AdapterFileError(folder / SAFETENSORS_NAME, str(error)) from error
    if result.missing_keys:
        warnings.warn(
            f"Found missing adapter keys while loading the checkpoint {str(folder)!r}: {result.missing_keys}",
            stacklevel=4,
        )
    if result.unexpected_keys:
        warnings.warn(
            f"Keys in {str(folder)!r} that match no module of adapter {adapter_name!r}: {result.unexpected_keys}",
            stacklevel=4,
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


def _selected_names(selected_adapters, peft_config) -> list[str]:
    """The adapters ``save_pretrained`` writes: all, or ``selected_adapters`` (a list of known names)."""
    if selected_adapters is None:
        return list(peft_config)
    if isinstance(selected_adapters, str) or not isinstance(selected_adapters, list | tuple | set):
        raise TypeError(f"selected_adapters must be a list of adapter names, got {selected_adapters!r}")
    not_names = [name for name in selected_adapters if not isinstance(name, str)]
    if not_names:
        raise TypeError(f"selected_adapters entries {not_names!r} are not adapter names (str)")
    unknown = [name for name in selected_adapters if name not in peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} not found; available adapters: {sorted(peft_config)}")
    return list(selected_adapters)


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
