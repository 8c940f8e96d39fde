"""The peft 0.21 LoRA options lora_engine cannot run yet, in one place: ``LoraConfig`` refuses them and
``lora-engine inspect`` warns about them. Reads plain values only (no torch), so ``inspect`` stays light.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: peft init options that need data, a quantizer, or a variant lora_engine lacks.
PEFT_ONLY_INITS = re.compile(r"lora_ga|mica")
#: LoRA variants, on when True.
FLAGS = ("use_qalora",)
#: On when not None: peft turns even an empty dict into a default sub-config and enables the variant.
WHEN_GIVEN = (
    "layer_replication",
    "megatron_config",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "alora_invocation_tokens",
)
#: Settings of the peft-only inits; empty ({} or None) means unset.
INIT_CONFIGS = ("lora_ga_config",)


def unsupported_options(config: Mapping[str, Any]) -> list[str]:
    """``"name=value"`` for each option of the LoRA config ``config`` (a dict read from adapter_config.json, or
    a ``LoraConfig``'s fields) that lora_engine does not support yet, in the order above; empty if none."""
    given = [name for name in FLAGS if config.get(name)]
    given += [name for name in WHEN_GIVEN if config.get(name) is not None]
    given += [name for name in INIT_CONFIGS if config.get(name)]
    found = [f"{name}={config[name]!r}" for name in given]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and PEFT_ONLY_INITS.fullmatch(init):
        found.append(f"init_lora_weights={init!r}")
    return found
