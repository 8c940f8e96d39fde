"""The entry points that wrap or inject (``get_peft_model``, ``inject_adapter_in_model``), and peft's registries
keyed by ``peft_type``."""

from __future__ import annotations

import warnings

from torch import nn

from lora_engine.config import LoraConfig, PeftConfig, PeftType
from lora_engine.ignored_options import warn_if_set
from lora_engine.layers.base import LoraLayer
from lora_engine.mixed import PeftMixedModel
from lora_engine.peft_format import SAVED_PREFIX
from lora_engine.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from lora_engine.tuner import LoraModel

# peft's registries, for code that looks a class up by peft_type; LoRA is the one type.
PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType | str, type[PeftConfig]] = {PeftType.LORA: LoraConfig}
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType | str, type[LoraModel]] = {PeftType.LORA: LoraModel}
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: dict[PeftType | str, type[LoraModel]] = {PeftType.LORA: LoraModel}


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config ``config_dict`` describes (``config_dict["peft_type"]`` must be ``"LORA"``); not mutated."""
    peft_type = config_dict.get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"peft_type={peft_type!r} is not supported; lora_engine implements 'LORA' only")
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**config_dict)


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel | PeftMixedModel:
    """Wrap ``model`` (mutated in place) with a new LoRA adapter; the class follows ``peft_config.task_type``.

    ``mixed=True`` returns a ``PeftMixedModel`` instead, on which several adapters can be active at once.
    ``low_cpu_mem_usage``: accepted for peft's signature; no effect (warns when True: ``ignored_options``).
    """
    warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        warnings.warn(
            "The model already holds LoRA layers; get_peft_model on it again nests adapters. "
            "Use PeftModel.add_adapter to add another adapter instead.",
            stacklevel=2,
        )
    name_or_path = getattr(model, "name_or_path", None) or None
    if peft_config.base_model_name_or_path not in (None, name_or_path):
        warnings.warn(
            f"peft_config.base_model_name_or_path was {peft_config.base_model_name_or_path!r}; "
            f"setting it to the model's {name_or_path!r}",
            stacklevel=2,
        )
    peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)
    model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return model_class(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Put LoRA layers into ``model`` in place, without a ``PeftModel`` wrapper; returns ``model``.

    State-dict keys then carry no ``base_model.model.`` prefix. With ``state_dict``, the targeted modules are
    the ones its LoRA keys name (``<module>.lora_A.weight`` ...), as peft does. ``low_cpu_mem_usage``: accepted
    for peft's signature; no effect (warns when True: ``ignored_options``).
    """
    warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
    if state_dict is not None:
        targets = sorted({key.rsplit(".lora_", 1)[0] for key in state_dict if ".lora_" in key})
        targets = [key.removeprefix(SAVED_PREFIX) for key in targets]
        peft_config.target_modules = set(targets)
    LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype=True)
    return model
