"""Loading an adapter folder into a model as one transaction: it fully succeeds, or the model is as it was.

``load_adapter_into`` (behind ``PeftModel.load_adapter`` and ``PeftModel.from_pretrained``) proceeds in two
phases. First everything that can be checked without touching the model is: the config (every field), the
weights file (header, dtypes, finite values), that config and weights belong together
(``file_checks.matching_config``), and each targeted module's rank in the config against the file and the
layer's size, so that an absurd ``r`` or ``rank_pattern`` is refused before anything is allocated. Only then is
the adapter injected and its weights copied in; if that raises, ``ModelSnapshot`` undoes it: no half-created
adapter, no LoRA wrappers left in the caller's model, the same ``requires_grad`` flags, train/eval modes and
active adapter, hence the same outputs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_engine.config import LoraConfig, PeftConfig
from lora_engine.file_checks import AdapterFileError, matching_config, read_safetensors_header
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper
from lora_engine.layers.parameters import ParameterShape, saved_prefix
from lora_engine.module_tree import named_modules_outside_adapters
from lora_engine.peft_format import CONFIG_NAME, SAFETENSORS_NAME, SAVED_PREFIX
from lora_engine.serialization import load_adapter_weights
from lora_engine.targeting import find_target_parameters, find_targets, rank_and_alpha


def read_adapter_config(folder: Path) -> LoraConfig:
    """The config that belongs with ``folder``'s weights (``matching_config``), every field checked; errors are
    ``AdapterFileError``s naming the file."""
    weights_path = folder / SAFETENSORS_NAME
    if not (folder / CONFIG_NAME).is_file() or not weights_path.is_file():
        return PeftConfig.from_pretrained(folder)  # its errors name the missing file
    _, metadata = read_safetensors_header(weights_path)
    config_path, config_dict = matching_config(folder, metadata)
    if config_path.name != CONFIG_NAME:
        warnings.warn(
            f"{str(folder)!r} holds an interrupted save: using the complete config {config_path.name!r} that "
            "belongs with its weights; the next save_pretrained to this folder tidies it up",
            stacklevel=3,
        )
    return PeftConfig.from_file_dict(config_path, config_dict)


def read_adapter_weights(
    folder: Path, device: torch.device | str, allow_non_finite: bool
) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(weights file, tensors)`` of ``folder``, each tensor a finite float (``load_adapter_weights``)."""
    weights = load_adapter_weights(str(folder), device=device, allow_non_finite=allow_non_finite)
    path = folder / SAFETENSORS_NAME
    return (path if path.is_file() else folder / "adapter_model.bin"), weights


def check_ranks(
    model: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor], weights_path: Path
) -> None:
    """Before injection: each module ``config`` targets in ``model`` gets the rank the file holds for it, and a
    module the file has no factor for gets a rank no larger than the layer itself. ``AdapterFileError`` naming
    the file, the module and both numbers otherwise. ``target_parameters`` get the same two checks, per parameter
    (``_check_parameter_ranks``). ``config`` is not mutated."""
    shapes = {key.removeprefix(SAVED_PREFIX): tuple(value.shape) for key, value in weights.items()}
    if config.target_parameters:
        _check_parameter_ranks(model, config, shapes, weights_path)
        if not config.target_modules:
            return  # peft: only parameters are targeted then
    wrapped = [
        name
        for name, module in named_modules_outside_adapters(model)
        if isinstance(module, LoraLayer | ModulesToSaveWrapper)
    ]
    probe = copy.deepcopy(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # injection warns about the same things just after
        try:
            targets = find_targets(model, probe, skip_within=wrapped)
        except ValueError as error:
            raise AdapterFileError(weights_path.parent / CONFIG_NAME, str(error)) from error
    for name in targets:
        rank, _ = rank_and_alpha(name, probe)
        for suffix in ("lora_A.weight", "lora_embedding_A"):
            shape = shapes.get(f"{name}.{suffix}")
            if shape and shape[0] != rank:
                raise AdapterFileError(
                    weights_path,
                    f"tensor {SAVED_PREFIX}{name}.{suffix} has rank {shape[0]} (shape {shape}) but the config gives "
                    f"{name!r} r={rank} (from r/rank_pattern): the weights and config are from different adapters",
                )
        if not any(f"{name}.{suffix}" in shapes for suffix in ("lora_A.weight", "lora_embedding_A")):
            size = _layer_size(model.get_submodule(name))
            if size is not None and rank > size:
                raise AdapterFileError(
                    weights_path.parent / CONFIG_NAME,
                    f"r={rank} for {name!r} exceeds the layer's size {size} and the weights file holds no factor "
                    "for it; refused before allocating it (is r or rank_pattern corrupt?)",
                )


def _check_parameter_ranks(
    model: nn.Module, config: LoraConfig, shapes: dict[str, tuple[int, ...]], weights_path: Path
) -> None:
    """``check_ranks`` for ``target_parameters``: a parameter with ``E`` experts gets factors of ``r·E`` rows, so
    its saved ``lora_A`` must have ``r·E`` rows; without one in the file, ``r`` may not exceed the larger side of
    one expert's matrix. Parameters the config matches nowhere are left to injection, which names them."""
    bases = {
        name: module.base_layer
        for name, module in named_modules_outside_adapters(model)
        if isinstance(module, LoraLayer)
    }
    try:
        found = find_target_parameters(model, config.target_parameters, bases)
    except TypeError as error:
        raise AdapterFileError(weights_path.parent / CONFIG_NAME, str(error)) from error
    for module_name, parameter_names in found.items():
        holder = bases.get(module_name, model.get_submodule(module_name))
        is_transposed = bool(getattr(holder, "is_transposed", False))
        for parameter_name in parameter_names:
            parameter = getattr(holder, parameter_name)
            if parameter.dim() not in (2, 3):
                continue  # injection refuses it, naming the shape
            shape = ParameterShape(module_name, parameter_name, parameter, is_transposed)
            rank, _ = rank_and_alpha(f"{module_name}.{parameter_name}", config)
            key = f"{module_name}.{saved_prefix(parameter_names, parameter_name)}lora_A.weight"
            saved = shapes.get(key)
            if saved is not None and saved[0] != rank * shape.num_experts:
                raise AdapterFileError(
                    weights_path,
                    f"tensor {SAVED_PREFIX}{key} has {saved[0]} rows (shape {saved}) but the config gives "
                    f"{module_name}.{parameter_name} r={rank} (from r/rank_pattern) over {shape.num_experts} "
                    f"experts, {rank * shape.num_experts} rows: the weights and config are from different adapters",
                )
            size = max(shape.in_features, shape.out_features)
            if saved is None and rank > size:
                raise AdapterFileError(
                    weights_path.parent / CONFIG_NAME,
                    f"r={rank} for {module_name}.{parameter_name} exceeds the parameter's size {size} and the "
                    "weights file holds no factor for it; refused before allocating it (is r or rank_pattern "
                    "corrupt?)",
                )


def _layer_size(module: nn.Module) -> int | None:
    """The larger of a layer's input and output sizes, whatever kind of layer it is."""
    module = getattr(module, "base_layer", module)
    sizes = [
        getattr(module, name, None)
        for name in ("in_features", "out_features", "num_embeddings", "embedding_dim", "nf")
    ]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        sizes += list(weight.shape)
    sizes = [size for size in sizes if isinstance(size, int)]
    return max(sizes) if sizes else None


def _what_a_load_may_touch(model: nn.Module, peft_model) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """The parameters and modules whose flags loading an adapter may change: every one of ``model`` when there is
    no ``PeftModel`` yet or ``model`` is in training mode (a load then calls ``eval()`` on all of it); otherwise
    what lies outside the adapters' own modules plus the active adapters' (a load freezes those). Skipping the
    other adapters keeps a load flat in the number of adapters loaded."""
    if peft_model is None or model.training:
        return list(model.parameters()), list(model.modules())
    modules = [module for _, module in named_modules_outside_adapters(model)]
    lora_model = peft_model.base_model
    for _, wrapper in lora_model.named_adapter_wrappers():
        for name in lora_model.active_adapters:
            for adapter_module in wrapper.adapter_modules(name):
                modules.extend(adapter_module.modules())
    parameters = {id(param): param for module in modules for param in module.parameters(recurse=False)}
    for _, wrapper in lora_model.named_adapter_wrappers():
        for name in lora_model.active_adapters:
            parameters.update((id(param), param) for param in wrapper.adapter_parameters(name))
    return list(parameters.values()), modules


class ModelSnapshot:
    """What loading an adapter may change in ``model`` (and its ``PeftModel``, if any), to undo it on failure:
    ``requires_grad`` of every parameter, each module's train/eval mode, the adapter names and the active
    adapter, ``config.pretraining_tp`` and transformers' input-grad hook."""

    def __init__(self, model: nn.Module, peft_model=None) -> None:
        self.model, self.peft_model = model, peft_model
        parameters, modules = _what_a_load_may_touch(model, peft_model)
        self.requires_grad = [(param, param.requires_grad) for param in parameters]
        self.training = [(module, module.training) for module in modules]
        self.adapter_names = set(peft_model.peft_config) if peft_model is not None else set()
        self.active_adapter = (
            copy.copy(peft_model.base_model.active_adapter) if peft_model is not None else None
        )
        config = getattr(model, "config", None)
        self.pretraining_tp = getattr(config, "pretraining_tp", None)
        self.had_grad_hook = hasattr(model, "_require_grads_hook")

    def restore(self, peft_model=None) -> None:
        """Undo: delete adapters added since the snapshot, or, given the ``PeftModel`` built since, unwrap
        every layer of ``model`` it wrapped; then put back the recorded flags."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.peft_model is not None:
                for name in set(self.peft_model.peft_config) - self.adapter_names:
                    self.peft_model.base_model.delete_adapter(name)
                self.peft_model.base_model.active_adapter = self.active_adapter
            elif peft_model is not None:
                peft_model.base_model.unload()
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)
        for module, training in self.training:
            module.training = training
        config = getattr(self.model, "config", None)
        if self.pretraining_tp is not None:
            config.pretraining_tp = self.pretraining_tp
        if not self.had_grad_hook and hasattr(self.model, "_require_grads_hook"):
            self.model.disable_input_require_grads()
