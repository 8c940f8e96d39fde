"""``PeftMixedModel``: several LoRA adapters active at once, their outputs summed (peft 0.21.2's mixed model,
for LoRA adapters only).

``get_peft_model(model, config, mixed=True)`` or ``PeftMixedModel(model, config)`` wraps ``model`` (mutated in
place, as ``PeftModel`` does); ``set_adapter(["a", "b"])`` activates both. It is not a ``PeftModel`` (peft's is
not either), but holds the same ``LoraModel`` as ``base_model``, so state-dict keys start with
``base_model.model.`` and adapters saved by ``PeftModel`` load with ``load_adapter``. As in peft it cannot
save (``save_pretrained`` raises ``NotImplementedError``): save with a ``PeftModel``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from torch import nn

from lora_engine.config import LoraConfig, PeftConfig
from lora_engine.peft_model import PeftModel, _check_config, _is_checkpointing
from lora_engine.tuner import LoraModel


class PeftMixedModel(nn.Module):
    """A model with LoRA adapters of which any subset can be active.

    Args:
        model: the transformers model; **mutated in place**.
        peft_config: the ``LoraConfig`` of the first adapter (active on creation).
        adapter_name: its name.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_config(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model = LoraModel(model, peft_config, adapter_name)
        self.config = getattr(model, "config", None)
        if _is_checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(self.config, "pretraining_tp"):
            self.config.pretraining_tp = 1

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "base_model"):
                raise
        return getattr(self.base_model, name)

    # The same views of the LoraModel as PeftModel's (PeftMixedModel is not a PeftModel, as in peft).
    peft_config = PeftModel.peft_config
    active_adapter = PeftModel.active_adapter
    active_adapters = PeftModel.active_adapters
    get_base_model = PeftModel.get_base_model
    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """Inside the context the model computes as the base model."""
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add an adapter; it starts inactive (``set_adapter`` activates it)."""
        _check_config(peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several at once; their outputs add up. Unknown names raise ``ValueError``.

        The active adapters become trainable unless ``inference_mode``. A ``modules_to_save`` wrapper can use only
        one adapter's copy, so activating two adapters that both hold one raises ``ValueError``.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"Adapter(s) {unknown} not found, available adapters: {sorted(self.peft_config)}"
            )
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"Adapter(s) {unknown} not found, available adapters: {sorted(self.peft_config)}"
            )
        for name in names:
            self.base_model.delete_adapter(name)

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args, **kwargs):
        """Load the adapter saved in the local folder ``model_id`` as ``adapter_name`` (inactive); returns
        ``(missing, unexpected)`` keys, as ``PeftModel.load_adapter``."""
        result = PeftModel.load_adapter(self, model_id, adapter_name, *args, **kwargs)
        self.set_adapter(self.active_adapters, inference_mode=not kwargs.get("is_trainable", False))
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        **kwargs,
    ) -> PeftMixedModel:
        """Wrap ``model`` and load the adapter saved in the local folder ``model_id`` (frozen unless
        ``is_trainable``)."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config.inference_mode = not is_trainable
        mixed = cls(model, config, adapter_name)
        mixed.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        return mixed

    def get_layer_status(self):
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self):
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    def save_pretrained(self, save_directory: str, *args, **kwargs) -> None:
        raise NotImplementedError(
            f"Saving is not supported for {type(self).__name__} (as in peft); save each adapter from a PeftModel"
        )
