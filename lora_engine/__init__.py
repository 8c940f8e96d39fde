"""lora_engine: a Triton-accelerated LoRA engine with peft 0.21.2's API and adapter files.

Change ``from peft import ...`` to ``from lora_engine import ...``.
"""

import importlib

from lora_engine.backend import get_backend, set_backend
from lora_engine.config import LoraConfig, PeftConfig, PeftType, TaskType
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.serialization import get_peft_model_state_dict, set_peft_model_state_dict

# The model classes and the functions that build them import transformers (PeftModel is a transformers
# PushToHubMixin and wraps a PreTrainedModel): imported on first use, so that `import lora_engine` (a config,
# the CLI, the file formats) does not pay for transformers. The names stay in __all__ and behave as before.
_LAZY = {
    "LoraModel": "lora_engine.tuner",
    "PeftModel": "lora_engine.peft_model",
    "PeftModelForCausalLM": "lora_engine.peft_model",
    "PeftModelForFeatureExtraction": "lora_engine.peft_model",
    "PeftModelForQuestionAnswering": "lora_engine.peft_model",
    "PeftModelForSeq2SeqLM": "lora_engine.peft_model",
    "PeftModelForSequenceClassification": "lora_engine.peft_model",
    "PeftModelForTokenClassification": "lora_engine.peft_model",
    "get_peft_model": "lora_engine.mapping",
    "inject_adapter_in_model": "lora_engine.mapping",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_backend",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_backend",
    "set_peft_model_state_dict",
]
