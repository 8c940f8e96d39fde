"""lora_engine: a Triton-accelerated LoRA engine with peft 0.21.2's API and adapter files.

Change ``from peft import ...`` to ``from lora_engine import ...``. Every name of peft's top level that applies to
LoRA is here; importing one that does not (another PEFT method, prompt learning, an unsupported LoRA init) raises an
``ImportError`` saying so (``lora_engine.peft_names``).
"""

from __future__ import annotations

import importlib
import importlib.util

from lora_engine.integrations import recognition

# Each public name -> the module that defines it. Names are imported on first access (PEP 562), so that
# `import lora_engine` and the `lora-engine` command load neither torch nor transformers until a name needs them.
_PUBLIC_NAMES = {
    "load_peft_weights": "lora_engine.adapter_files",
    **dict.fromkeys(
        (
            "AutoPeftModel",
            "AutoPeftModelForCausalLM",
            "AutoPeftModelForFeatureExtraction",
            "AutoPeftModelForQuestionAnswering",
            "AutoPeftModelForSeq2SeqLM",
            "AutoPeftModelForSequenceClassification",
            "AutoPeftModelForTokenClassification",
        ),
        "lora_engine.auto",
    ),
    "get_backend": "lora_engine.backend",
    "set_backend": "lora_engine.backend",
    "get_base_model_state_dict": "lora_engine.base_state_dict",
    "set_base_model_state_dict": "lora_engine.base_state_dict",
    **dict.fromkeys(("LoraConfig", "PeftConfig", "PeftType", "TaskType"), "lora_engine.config"),
    **dict.fromkeys(("NoMatchingPeftModuleError", "PeftError", "PeftWarning"), "lora_engine.errors"),
    "prepare_model_for_kbit_training": "lora_engine.kbit",
    "replace_lora_weights_loftq": "lora_engine.initialization.loftq",
    "LoftQConfig": "lora_engine.initialization.loftq_config",
    "preprocess_corda": "lora_engine.initialization.corda",
    **dict.fromkeys(("CordaConfig", "EvaConfig"), "lora_engine.initialization.data_driven_init_configs"),
    **dict.fromkeys(("get_eva_state_dict", "initialize_lora_eva_weights"), "lora_engine.initialization.eva"),
    **dict.fromkeys(
        (
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "get_peft_config",
            "get_peft_model",
            "inject_adapter_in_model",
        ),
        "lora_engine.mapping",
    ),
    "PeftMixedModel": "lora_engine.mixed",
    **dict.fromkeys(
        (
            "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
            "PeftModel",
            "PeftModelForCausalLM",
            "PeftModelForFeatureExtraction",
            "PeftModelForQuestionAnswering",
            "PeftModelForSeq2SeqLM",
            "PeftModelForSequenceClassification",
            "PeftModelForTokenClassification",
        ),
        "lora_engine.peft_model",
    ),
    "PromptLearningConfig": "lora_engine.peft_names",
    "get_peft_model_state_dict": "lora_engine.serialization",
    "set_peft_model_state_dict": "lora_engine.serialization",
    "get_layer_status": "lora_engine.status",
    "get_model_status": "lora_engine.status",
    "LoraModel": "lora_engine.tuner",
    "cast_mixed_precision_params": "lora_engine.utils.other",
    "shift_tokens_right": "lora_engine.utils.other",
}

# transformers' Trainer, accelerate and TRL recognise our PeftModel and LoraConfig as peft's (see that module);
# installing imports none of them, nor torch.
recognition.install()

__version__ = "0.1.0"

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str):
    """A public name, imported from its module on first access and kept here; any other name raises peft_names'
    ``ImportError`` (saying why a peft name is not here)."""
    if name.startswith(
        "__"
    ):  # tools probing for __wrapped__, __file__, ...: no need to load peft_names (torch)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _PUBLIC_NAMES.get(name)
    if module is None and name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # `from lora_engine import config_checks` asks here before importing the submodule, possibly while
        # lora_engine.config (which peft_names imports) is half-initialised: let the import system load it.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module is None:
        from lora_engine.peft_names import unsupported_name

        raise unsupported_name(__name__, name)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_NAMES})
