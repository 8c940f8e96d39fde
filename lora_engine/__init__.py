"""lora_engine: a Triton-accelerated LoRA engine with peft 0.21.2's API and adapter files.

Change ``from peft import ...`` to ``from lora_engine import ...``. Every name of peft's top level that applies to
LoRA is here; importing one that does not (another PEFT method, prompt learning, an unsupported LoRA init) raises an
``ImportError`` saying so (``lora_engine.peft_names``).
"""

from lora_engine.adapter_files import load_peft_weights
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
from lora_engine.base_state_dict import get_base_model_state_dict, set_base_model_state_dict
from lora_engine.config import LoraConfig, PeftConfig, PeftType, TaskType
from lora_engine.errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from lora_engine.integrations import recognition
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.loftq import replace_lora_weights_loftq
from lora_engine.loftq_config import LoftQConfig
from lora_engine.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from lora_engine.mixed import PeftMixedModel
from lora_engine.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from lora_engine.peft_names import PromptLearningConfig, unsupported_name
from lora_engine.serialization import get_peft_model_state_dict, set_peft_model_state_dict
from lora_engine.status import get_layer_status, get_model_status
from lora_engine.tuner import LoraModel
from lora_engine.utils.other import cast_mixed_precision_params, shift_tokens_right

# transformers' Trainer, accelerate and TRL recognise our PeftModel and LoraConfig as peft's (see that module).
recognition.install()

__version__ = "0.1.0"

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftMixedModel",
    "PeftWarning",
    "PromptLearningConfig",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "load_peft_weights",
    "set_base_model_state_dict",
    "shift_tokens_right",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoftQConfig",
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
    "replace_lora_weights_loftq",
    "set_backend",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    raise unsupported_name(__name__, name)
