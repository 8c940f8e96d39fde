"""``AutoPeftModel*``: load the base model an adapter folder names, then the adapter, in one call (peft's ``auto``).

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``adapter_dir/adapter_config.json``, loads its
``base_model_name_or_path`` with the matching transformers auto class, and returns
``PeftModelForCausalLM.from_pretrained(base, adapter_dir)``. Both folders must be local: lora_engine never
downloads, so a Hub id raises ``FileNotFoundError`` saying which path to make local. The checks are peft's: the
class must fit the saved ``task_type``; plain ``AutoPeftModel`` needs ``task_type=None`` and imports the base
class the config's ``auto_mapping`` names, only from an allowed library. A tokenizer saved next to the adapter
with more tokens than the base's embeddings resizes them, as in peft.
"""

from __future__ import annotations

import importlib
import os

from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from lora_engine.config import PeftConfig
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

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# Keywords meant for the adapter, never passed on to the base model's from_pretrained.
_ADAPTER_KWARGS = (
    "subfolder",
    "autocast_adapter_dtype",
    "ephemeral_gpu_offload",
    "key_mapping",
    "torch_device",
)


def get_default_import_allowlist() -> list[str]:
    """Libraries an ``auto_mapping`` may import the base class from (peft's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist: list[str], parent_name: str) -> bool:
    """Whether ``parent_name`` is an allowed library or a module inside one."""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    _target_class = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs,
    ) -> PeftModel:
        """The base model named in the adapter folder's config, with the adapter loaded (frozen unless
        ``is_trainable``). Other keywords go to the base model's ``from_pretrained`` (``torch_dtype``...) and to
        ``PeftModel.from_pretrained``."""
        adapter_dir = os.fspath(pretrained_model_name_or_path)
        peft_config = PeftConfig.from_pretrained(adapter_dir, subfolder=kwargs.get("subfolder"))
        target_class = cls._base_class(peft_config, import_allowlist or get_default_import_allowlist())
        base_kwargs = {key: value for key, value in kwargs.items() if key not in _ADAPTER_KWARGS}
        base_model = target_class.from_pretrained(
            _local_base_path(peft_config, adapter_dir), local_files_only=True, **base_kwargs
        )
        _resize_to_saved_tokenizer(base_model, adapter_dir)
        return cls._target_peft_class.from_pretrained(
            base_model,
            adapter_dir,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            **kwargs,
        )

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, import_allowlist: list[str]):
        task_type = peft_config.task_type
        if cls._target_class is None and task_type is not None:
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                f"(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`); this adapter has {task_type.value!r}"
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    "task type."
                )
            return cls._target_class
        if peft_config.auto_mapping is None:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct "
                "model for your task type: the adapter has neither task_type nor auto_mapping"
            )
        library = peft_config.auto_mapping["parent_library"]
        if not check_import_allowlist(import_allowlist, library):
            raise ValueError(
                f"The auto mapping wants to import '{library}' which is not in the import allowlist. If you are "
                f"sure that importing this library is safe, specify `import_allowlist=['{library}']` in "
                "`from_pretrained()`."
            )
        return getattr(importlib.import_module(library), peft_config.auto_mapping["base_model_class"])


def _local_base_path(peft_config: PeftConfig, adapter_dir: str) -> str:
    base_path = peft_config.base_model_name_or_path
    if not base_path:
        raise ValueError(
            f"{adapter_dir!r}/adapter_config.json has no base_model_name_or_path, so the base model is unknown; "
            "load the base model yourself and call PeftModel.from_pretrained(base_model, adapter_dir)"
        )
    if not os.path.isdir(base_path):
        raise FileNotFoundError(
            f"the base model {base_path!r} named in {adapter_dir!r}/adapter_config.json is not a local folder; "
            "lora_engine loads models from local folders only: download it first (huggingface_hub."
            "snapshot_download) and set base_model_name_or_path to that folder, or load the base model yourself "
            "and call PeftModel.from_pretrained(base_model, adapter_dir)"
        )
    return base_path


def _resize_to_saved_tokenizer(base_model: nn.Module, adapter_dir: str) -> None:
    if not os.path.isfile(os.path.join(adapter_dir, TOKENIZER_CONFIG_NAME)):
        return
    if not hasattr(base_model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters saved with ``task_type=None``: the base class comes from ``auto_mapping``."""

    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = AutoModelForCausalLM
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = AutoModelForSeq2SeqLM
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForSequenceClassification
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForTokenClassification
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = AutoModelForQuestionAnswering
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = AutoModel
    _target_peft_class = PeftModelForFeatureExtraction
