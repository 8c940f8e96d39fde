"""``PeftModel`` and its task classes: the user-facing wrapper, with peft 0.21.2's API and files.

``PeftModel.base_model`` is a ``LoraModel`` and ``PeftModel.base_model.model`` the transformers model, so
state-dict keys start with ``base_model.model.`` as in peft. How it passes for a transformers ``PreTrainedModel``
(for the stock ``Trainer`` and ``generate``) is ``integrations/pretrained.py``; the save and load walks are
``adapter_files.py``.

Over 450 lines on purpose: one thin method per peft ``PeftModel`` method, with peft's signatures and docstrings,
plus the six task classes peft exposes under this module's path (``lora_engine.peft_model.PeftModelFor...``);
each method delegates to the tuner or ``adapter_files``, so the length is surface, not logic.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lora_engine.adapter_files import load_adapter_folder, load_into_new_peft_model, save_adapters
from lora_engine.adapter_loading import read_adapter_config
from lora_engine.config import LoraConfig, PeftType, TaskType
from lora_engine.ignored_options import warn_if_set
from lora_engine.integrations.pretrained import WrappedPreTrainedModel
from lora_engine.model_card import create_or_update_model_card
from lora_engine.status import (
    TunerLayerStatus,
    TunerModelStatus,
    count_parameters,
    get_layer_status,
    get_model_status,
)
from lora_engine.tuner import LoraModel


class PeftModel(WrappedPreTrainedModel):
    """A transformers model with LoRA adapters; peft 0.21.2's ``PeftModel`` API.

    Args:
        model: the transformers model; **mutated in place** (targeted modules are replaced by LoRA wrappers).
        peft_config: the ``LoraConfig`` of the first adapter.
        adapter_name: its name (a plain folder name; ``"default"`` saves at the folder root).
        autocast_adapter_dtype: keep fp16/bf16 adapters in fp32, as peft does.
        low_cpu_mem_usage: accepted for peft's signature; no effect (warns when True: ``ignored_options``).
    """

    # Modules a task head adds to ``modules_to_save`` (peft does the same per task class).
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
        _check_config(peft_config)
        self._add_task_modules_to_save(peft_config)
        name_or_path = getattr(model, "name_or_path", None) or None
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = name_or_path
        self.peft_type = PeftType.LORA
        self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype)
        self.config = getattr(model, "config", None)
        if _is_checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the checkpointed graph
        if hasattr(self.config, "pretraining_tp"):
            self.config.pretraining_tp = 1

    @property
    def base_model(self) -> LoraModel:  # PreTrainedModel's property would recurse
        return self._modules["base_model"]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "base_model"):
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError as err:
            # Name this class and the wrapped model, not only the model the lookup ended in.
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}, and neither has the "
                f"{type(self.get_base_model()).__name__!r} it wraps"
            ) from err

    def _add_task_modules_to_save(self, config: LoraConfig) -> None:
        if not self.task_modules_to_save:
            return
        names = list(config.modules_to_save or [])
        config.modules_to_save = names + [name for name in self.task_modules_to_save if name not in names]

    # ------------------------------------------------------------------ adapters
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        """The transformers model, with its LoRA wrappers in place."""
        return self.base_model.model

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter; it starts inactive and frozen (``set_adapter`` activates it).

        ``low_cpu_mem_usage``: accepted for peft's signature; no effect (warns when True: ``ignored_options``).
        """
        warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
        _check_config(peft_config)
        self._add_task_modules_to_save(peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the one active adapter; it becomes trainable unless ``inference_mode``."""
        if not isinstance(adapter_name, str):
            raise TypeError(
                f"PeftModel.set_adapter takes one adapter name, got {adapter_name!r}; to activate several "
                "adapters at once use model.base_model.set_adapter([...])"
            )
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes as the base model; on exit adapters are back."""
        already_disabled = all(
            layer.disable_adapters for _, layer in self.base_model.named_adapter_wrappers()
        )
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if not already_disabled:
                self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """peft's per-layer adapter report; see ``lora_engine.status``."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """peft's model-wide adapter report; see ``lora_engine.status``."""
        return get_model_status(self)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts as peft counts them; see ``status.count_parameters``."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs,
    ) -> None:
        """Write each selected adapter as ``adapter_config.json`` + ``adapter_model.safetensors``, and peft's model
        card ``README.md`` in ``save_directory`` (an existing one is updated, as peft does).

        ``default`` goes to ``save_directory``, any other adapter to ``save_directory/<name>``. Every name is
        checked before anything is written; each adapter's pair of files is written all or nothing
        (``serialization.save_adapter_files``). ``state_dict=`` (passed by the
        Trainer under DeepSpeed/FSDP) supplies the values. Only the main process writes. A Trainer checkpoint
        folder gets the same files as peft's (see ``integrations/pretrained.py``).
        ``path_initial_model_for_weight_conversion``: the folder a PiSSA/OLoRA
        adapter was saved to before training; the adapter is then saved as plain LoRA for the original base
        (``init_conversion``), as peft does.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; it must be a folder")
        save_adapters(
            self,
            save_directory,
            selected_adapters,
            safe_serialization=safe_serialization,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            save_kwargs=kwargs,
            initial_folder=path_initial_model_for_weight_conversion,
        )

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write or update peft's model card ``output_dir/README.md``; see ``lora_engine.model_card``."""
        create_or_update_model_card(self, output_dir, causal_lm=isinstance(self, PeftModelForCausalLM))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in the local folder ``model_id``.

        The wrapper class follows the saved ``task_type`` when called on ``PeftModel``. With
        ``is_trainable=False`` the adapter is frozen and the model put in eval mode. ``allow_non_finite=True``
        (a keyword) accepts NaN/Inf weights. Everything that needs no change to ``model`` is checked first; if
        anything raises, ``model`` is left exactly as it was: no LoRA wrapper stays injected, and the same
        ``requires_grad`` flags and train/eval modes (``adapter_files.load_into_new_peft_model``).
        ``ephemeral_gpu_offload``, ``low_cpu_mem_usage``: accepted for peft's signature; no effect (warn when
        True: ``ignored_options``).
        """
        warn_if_set("ephemeral_gpu_offload", ephemeral_gpu_offload, False)
        warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
        folder = Path(model_id) / kwargs["subfolder"] if kwargs.get("subfolder") else Path(model_id)
        if config is None:
            config = read_adapter_config(folder)
        config.inference_mode = not is_trainable
        model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls) if cls is PeftModel else cls
        options = dict(kwargs, autocast_adapter_dtype=autocast_adapter_dtype, key_mapping=key_mapping)
        return load_into_new_peft_model(
            model_class, model, folder, adapter_name, config, is_trainable, options
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        replace_existing: bool = False,
        allow_non_finite: bool = False,
        **kwargs,
    ):
        """Load the adapter in folder ``model_id`` as ``adapter_name``; returns ``(missing, unexpected)`` keys.

        A new name is added (inactive, like peft). An existing ``adapter_name`` is replaced (and stays active if
        it was) when its config means the same (``file_checks.BOUND_FIELDS`` equal: peft's reload of the
        weights) or with ``replace_existing=True``; otherwise it is a ValueError naming it (peft would keep the
        old scaling with the new weights). ``allow_non_finite=True`` accepts NaN/Inf weights. Every check that
        needs no change to the model runs first; if anything raises, the model is left exactly as it was
        (``adapter_loading``); errors about a file are ``AdapterFileError``s naming it. The two keywords after
        ``key_mapping`` are ours, placed after peft's parameters so that peft's calls keep their meaning.
        ``ephemeral_gpu_offload``, ``low_cpu_mem_usage``: accepted for peft's signature; no effect (warn when
        True: ``ignored_options``).
        """
        warn_if_set("ephemeral_gpu_offload", ephemeral_gpu_offload, False)
        warn_if_set("low_cpu_mem_usage", low_cpu_mem_usage, False)
        folder = Path(model_id) / kwargs["subfolder"] if kwargs.get("subfolder") else Path(model_id)
        return load_adapter_folder(
            self,
            folder,
            adapter_name,
            is_trainable=is_trainable,
            torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype,
            key_mapping=key_mapping,
            ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
            replace_existing=replace_existing,
            allow_non_finite=allow_non_finite,
        )

    # ------------------------------------------------------------------ running
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward. ``adapter_names`` (one per batch row, ``"__base__"`` for the base
        model) runs each row with its own adapter. ``task_ids``: accepted for peft's signature and dropped; no
        effect (warns when given: ``ignored_options``)."""
        warn_if_set("task_ids", kwargs.pop("task_ids", None))
        if adapter_names is None:
            return self.get_base_model()(*args, **kwargs)
        _check_rows(adapter_names, args, kwargs)
        with self.base_model.route_rows(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's ``generate``; ``adapter_names`` as in ``forward``, one per input row."""
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        _check_rows(adapter_names, args, kwargs)
        # generate repeats each input row for beams (or for several samples): repeat its adapter with it.
        generation_config = kwargs.get("generation_config") or self.get_base_model().generation_config
        num_beams = kwargs.get("num_beams", generation_config.num_beams) or 1
        samples = kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1
        repeats = num_beams if num_beams > 1 else samples
        expanded = [name for name in adapter_names for _ in range(repeats)]
        with self.base_model.route_rows(expanded):
            return self.get_base_model().generate(*args, **kwargs)


def _check_rows(adapter_names: list[str], args: tuple, kwargs: dict) -> None:
    """``adapter_names`` must be a list with one entry per row of the inputs."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, list | tuple):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
    named_inputs = (kwargs[key] for key in ("input_ids", "inputs_embeds") if kwargs.get(key) is not None)
    inputs = args[0] if args else next(named_inputs, None)
    if isinstance(inputs, torch.Tensor) and len(adapter_names) != inputs.shape[0]:
        raise ValueError(
            f"Length of `adapter_names` ({len(adapter_names)}) should be the same as the number of inputs "
            f"({inputs.shape[0]})"
        )


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _check_config(config) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_engine supports LoraConfig adapters only, got {type(config).__name__}")


class _InputsAndLabelsForward:
    """The explicit forward signature transformers' Trainer inspects: ``labels`` gives it ``label_names``,
    and named inputs keep ``remove_unused_columns`` from dropping them. ``None`` arguments are not passed on."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        named = dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels
        )
        named.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return PeftModel.forward(self, **_given(named, return_dict=return_dict, task_ids=task_ids), **kwargs)


def _given(named: dict, **more) -> dict:
    return {key: value for key, value in {**named, **more}.items() if value is not None}


class PeftModelForCausalLM(_InputsAndLabelsForward, PeftModel):
    """``PeftModel`` for causal language models."""


class PeftModelForSequenceClassification(_InputsAndLabelsForward, PeftModel):
    """``PeftModel`` for sequence classification; the ``classifier``/``score`` head is trained and saved."""

    task_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """``PeftModel`` for token classification; the ``classifier``/``score`` head is trained and saved."""


class PeftModelForFeatureExtraction(_InputsAndLabelsForward, PeftModel):
    """``PeftModel`` for models that return hidden states (embeddings)."""


class PeftModelForQuestionAnswering(PeftModel):
    """``PeftModel`` for extractive question answering; the ``qa_outputs`` head is trained and saved."""

    task_modules_to_save = ("qa_outputs",)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        named.update(start_positions=start_positions, end_positions=end_positions)
        named.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return super().forward(**_given(named, return_dict=return_dict, task_ids=task_ids), **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """``PeftModel`` for encoder-decoder language models."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        decoder_inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        named = dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels
        )
        named.update(
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
        )
        named.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return super().forward(**_given(named, return_dict=return_dict, task_ids=task_ids), **kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType | str | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
