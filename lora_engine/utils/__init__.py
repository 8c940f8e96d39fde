"""``lora_engine.utils``: the names user code imports from ``peft.utils``, as thin re-exports of our own.

``lora_engine.utils.hotswap`` is peft's ``peft.utils.hotswap``. A peft name that is not LoRA (see
``lora_engine.peft_names``) raises an ``ImportError`` that says so.
"""

from lora_engine.adapter_files import load_peft_weights
from lora_engine.base_state_dict import get_base_model_state_dict, set_base_model_state_dict
from lora_engine.config import PeftType, TaskType
from lora_engine.errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from lora_engine.initialization.loftq import replace_lora_weights_loftq
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper
from lora_engine.peft_format import BIN_NAME as WEIGHTS_NAME
from lora_engine.peft_format import CONFIG_NAME
from lora_engine.peft_format import SAFETENSORS_NAME as SAFETENSORS_WEIGHTS_NAME
from lora_engine.peft_names import unsupported_name
from lora_engine.serialization import get_peft_model_state_dict, set_peft_model_state_dict
from lora_engine.utils.other import cast_mixed_precision_params, shift_tokens_right

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]


def __getattr__(name: str):
    raise unsupported_name(__name__, name)
