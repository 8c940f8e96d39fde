"""lora_engine: a Triton-accelerated LoRA engine with peft 0.21.2's API and adapter files.

Change ``from peft import ...`` to ``from lora_engine import ...``.
"""

from lora_engine.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from lora_engine.backend import get_backend, set_backend
from lora_engine.config import LoraConfig, PeftConfig, PeftType, TaskType
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.mapping import get_peft_model, inject_adapter_in_model
from lora_engine.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from lora_engine.serialization import get_peft_model_state_dict, set_peft_model_state_dict
from lora_engine.tuner import LoraModel

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
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
