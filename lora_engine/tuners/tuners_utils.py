"""``lora_engine.tuners.tuners_utils``: peft's ``BaseTunerLayer`` and ``check_target_module_exists``.

``BaseTunerLayer`` is our ``LoraLayer`` (every adapter layer lora_engine creates is a LoRA layer), so
``isinstance(module, BaseTunerLayer)`` picks out the same modules as with peft; ``ModulesToSaveWrapper`` is not
one, as in peft.
"""

from __future__ import annotations

from lora_engine.layers.base import LoraLayer as BaseTunerLayer
from lora_engine.peft_names import unsupported_name
from lora_engine.targeting import is_targeted

__all__ = ["BaseTunerLayer", "check_target_module_exists"]


def check_target_module_exists(config, key: str) -> bool:
    """Whether the module named ``key`` gets an adapter under ``config``, by name alone (peft's rules:
    ``exclude_modules``, regex or suffix ``target_modules``, ``layers_to_transform``)."""
    return is_targeted(key, config)


def __getattr__(name: str):
    raise unsupported_name(__name__, name)
