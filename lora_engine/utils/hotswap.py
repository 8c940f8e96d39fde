"""Hot-swapping: replace an adapter's weights in place, so that a ``torch.compile``-d model does not recompile.

peft 0.21.2's ``peft.utils.hotswap`` API. ``hotswap_adapter(model, folder, "default")`` copies the saved factors
into the existing ``lora_A`` / ``lora_B`` tensors (same objects, same shapes) and updates the scaling; the adapter
keeps its name. A compiled graph guards on tensor shapes but not on values, so nothing recompiles when:

- every swapped adapter has the same rank at each module, or ``prepare_model_for_compiled_hotswap(model,
  target_rank=R)`` zero-padded the factors to the largest rank ``R`` beforehand (zero rows of ``A`` and columns
  of ``B`` leave ``B A`` unchanged; a smaller adapter is copied into the leading rows / columns, the rest zeroed);
- the scalings differ only when ``prepare_model_for_compiled_hotswap`` turned them into 0-d tensors first (a
  float scaling is a constant in the compiled graph; a tensor is filled in place).

Call ``prepare_model_for_compiled_hotswap`` after loading the first adapter and before compiling. Both functions
mutate the model in place. As in peft, the adapter's ``peft_config`` entry is left as it was, the new adapter
must target the same modules (an extra module raises ``RuntimeError`` before anything changes; a module it does
not target gets zero factors), and a merged adapter cannot be swapped.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import nn

from lora_engine.config import LoraConfig, PeftConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.peft_format import SAVED_PREFIX
from lora_engine.serialization import adapter_key_map, load_adapter_weights
from lora_engine.targeting import rank_and_alpha
from lora_engine.tuner import LoraModel

# Settings that change the output in ways the swapped weights and scaling cannot carry (peft's list).
CONFIG_KEYS_TO_CHECK = {"LORA": ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _adapted_model(model: nn.Module) -> nn.Module:
    """The transformers model holding the LoRA layers, under a compiled wrapper and a PeftModel if any."""
    model = getattr(model, "_orig_mod", model)
    lora_model = model._modules.get("base_model")
    return lora_model.model if isinstance(lora_model, LoraModel) else model


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _set_factor(layer: LoraLayer, container_name: str, adapter_name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of one factor (a new, padded shape), keeping its requires_grad."""
    entry = getattr(layer, container_name)[adapter_name]
    old = entry.weight if isinstance(entry, nn.Linear) else entry
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    if isinstance(entry, nn.Linear):
        entry.weight = new
        entry.out_features, entry.in_features = value.shape
    else:
        getattr(layer, container_name)[adapter_name] = new


def _pad_factors(layer: LoraLayer, module_name: str, target_rank: int) -> None:
    container_A, container_B = layer.adapter_containers
    for adapter_name in layer.adapter_names:
        lora_A, lora_B = layer.lora_factors(adapter_name)
        rank = lora_A.shape[0]
        if rank > target_rank:
            raise ValueError(
                f"Trying to pad the adapter {adapter_name!r} of {module_name!r} to the target rank {target_rank}, "
                f"but its rank is larger ({rank}); pass the largest rank of all adapters to be swapped in"
            )
        if rank == target_rank:
            continue
        padded_A = lora_A.new_zeros(target_rank, lora_A.shape[1])
        padded_A[:rank] = lora_A.detach()
        padded_B = lora_B.new_zeros(lora_B.shape[0], target_rank)
        padded_B[:, :rank] = lora_B.detach()
        _set_factor(layer, container_A, adapter_name, padded_A)
        _set_factor(layer, container_B, adapter_name, padded_B)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make later hot-swaps recompile nothing: scalings become 0-d tensors, and with ``target_rank`` every LoRA
    factor is zero-padded to that rank (outputs unchanged). ``config`` (one config or ``model.peft_config``) gets
    ``r`` and its ``rank_pattern`` values set to ``target_rank``. Raises ``ValueError`` for a model holding no
    LoRA layer, a rank above ``target_rank``, or (``check_compiled="error"``) an already compiled model."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(
            f"check_compiled should be one of 'error', 'warn', or 'ignore', got {check_compiled!r}"
        )
    if hasattr(model, "_orig_mod"):
        message = (
            "prepare_model_for_compiled_hotswap was called with a model that is already compiled; call it before "
            "compiling the model"
        )
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message + ": this will likely result in re-compilation", stacklevel=2)
    layers = _lora_layers(_adapted_model(model))
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure to call prepare_model_for_compiled_hotswap after "
            "loading the first adapter and before loading the second adapter"
        )
    for module_name, layer in layers:
        device = layer.lora_factors(layer.adapter_names[0])[0].device
        for adapter_name, scaling in layer.scaling.items():
            if not isinstance(scaling, torch.Tensor):
                layer.scaling[adapter_name] = torch.tensor(float(scaling), device=device)
        if target_rank is not None:
            _pad_factors(layer, module_name, target_rank)
    if config is None or target_rank is None:
        return
    for lora_config in config.values() if isinstance(config, dict) else [config]:
        lora_config.r = target_rank
        lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern or {}, target_rank)


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise ``ValueError`` naming the first setting (of ``CONFIG_KEYS_TO_CHECK``) where the configs differ."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type} and {config1.peft_type}")
    dict0, dict1 = config0.to_dict(), config1.to_dict()
    for key in CONFIG_KEYS_TO_CHECK["LORA"]:
        if dict0.get(key) != dict1.get(key):
            raise ValueError(f"Configs are incompatible: for {key}, {dict0.get(key)} != {dict1.get(key)}")


def _copy_into(old: torch.Tensor, new: torch.Tensor, key: str) -> None:
    """Copy ``new`` into ``old`` in place; a smaller rank fills the leading rows (A) or columns (B), zeros the rest.
    A larger rank replaces the data (the shape changes, so a compiled model recompiles, as in peft)."""
    new = new.to(device=old.device, dtype=old.dtype)
    with torch.no_grad():
        if old.shape == new.shape:
            old.copy_(new)
        elif old.dim() == 2 and all(o >= n for o, n in zip(old.shape, new.shape)):
            old.zero_()
            old[: new.shape[0], : new.shape[1]].copy_(new)
        elif old.dim() == 2 and (old.shape[0] == new.shape[0] or old.shape[1] == new.shape[1]):
            old.data = new.clone()
        else:
            raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {old.shape} vs {new.shape}")


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap ``state_dict`` (saved keys, with or without the ``base_model.model.`` prefix) into ``adapter_name``.

    Scalings follow ``config`` (its r, lora_alpha, patterns and rslora). Raises ``ValueError`` if the adapter is
    merged, ``RuntimeError`` (changing nothing) if a key matches nothing of this adapter.
    """
    adapted = _adapted_model(model)
    layers = _lora_layers(adapted)
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(
            f"Cannot hot-swap adapter {adapter_name!r} because it is currently merged into the base weights; "
            "unmerge it first (model.unmerge_adapter())"
        )
    key_map = adapter_key_map(adapted, adapter_name)
    in_memory = dict(adapted.named_parameters())
    new_values = {key.removeprefix(SAVED_PREFIX): value for key, value in state_dict.items()}
    unexpected = [key for key in new_values if key_map.get(key, key) not in in_memory]
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}. "
            f"The new adapter must target the same modules as adapter {adapter_name!r}."
        )
    for saved_key, memory_key in key_map.items():
        if saved_key not in new_values and parameter_prefix in saved_key:
            with torch.no_grad():
                in_memory[memory_key].zero_()  # a module the new adapter does not target adds nothing
    for key, value in new_values.items():
        _copy_into(in_memory[key_map.get(key, key)], value, key)
    for module_name, layer in layers:
        if adapter_name not in layer.scaling:
            continue
        rank, alpha = rank_and_alpha(module_name, config)
        scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        if isinstance(layer.scaling[adapter_name], torch.Tensor):
            layer.scaling[adapter_name].fill_(scaling)
        else:
            layer.scaling[adapter_name] = scaling


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs,
) -> None:
    """Replace adapter ``adapter_name`` of ``model`` (a ``PeftModel``, possibly compiled) by the one saved in the
    local folder ``model_name_or_path`` (``subfolder=`` as in ``from_pretrained``); the name stays.

    Raises ``ValueError`` if the configs differ in a setting the swap cannot carry (``CONFIG_KEYS_TO_CHECK``).
    """
    root = getattr(model, "_orig_mod", model)
    if adapter_name not in root.peft_config:
        raise ValueError(
            f"Adapter {adapter_name!r} not found; available adapters: {sorted(root.peft_config)}"
        )
    subfolder = kwargs.get("subfolder")
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder)
    check_hotswap_configs_compatible(root.peft_config[adapter_name], config)
    folder = f"{model_name_or_path}/{subfolder}" if subfolder else model_name_or_path
    if torch_device is None:
        torch_device = next(root.parameters()).device
    state_dict = load_adapter_weights(folder, device=torch_device)
    hotswap_adapter_from_state_dict(root, state_dict, adapter_name, config)
