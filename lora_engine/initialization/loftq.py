"""``replace_lora_weights_loftq``: LoftQ factors for a model whose base is already a bitsandbytes 4-bit model.

peft 0.21.2's function, with its contract: the 4-bit layers stay as they are; each LoRA adapter on one gets
``lora_A, lora_B`` = the rank-r SVD factors of ``W − Q`` (``layers.loftq.loftq_residual_factors``), ``Q`` the
layer's decoded 4-bit weight and ``W`` the original weight, read lazily from the base model's safetensors file(s)
(pickle checkpoints cannot be read lazily, so they are not supported, as in peft).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open

from lora_engine.layers.loftq import loftq_residual_factors
from lora_engine.peft_format import SAVED_PREFIX

SAFETENSORS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"


class _OriginalWeights:
    """Reads the base model's original tensors by key from ``model.safetensors`` or its shards, one at a time.

    ``model_path`` is the file, or a folder holding it (or its ``model.safetensors.index.json`` and shards); None
    means the folder the base model was loaded from (``config._name_or_path``), or that model's snapshot in the
    local Hugging Face cache (never downloaded).
    """

    def __init__(self, peft_model, model_path: str | os.PathLike | None) -> None:
        base_model = peft_model.get_base_model()
        if model_path is None:
            model_path = _local_model_folder(base_model)
        model_path = os.fspath(model_path)
        if not model_path.endswith(SAFETENSORS_FILE):
            model_path = os.path.join(model_path, SAFETENSORS_FILE)
        self.base_model_prefix = getattr(base_model, "base_model_prefix", None)
        if os.path.isfile(model_path):
            self.file_of = {key: model_path for key in _keys(model_path)}
            return
        index_path = os.path.join(os.path.dirname(model_path), SHARD_INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"Could not find file for {model_path}, ensure that there is a (sharded) safetensors file of the "
                f"model ({SAFETENSORS_FILE}, or {SHARD_INDEX_FILE} and its shards)"
            )
        with open(index_path, encoding="utf-8") as index_file:
            weight_map = json.load(index_file)["weight_map"]
        folder = os.path.dirname(index_path)
        self.file_of = {key: os.path.join(folder, shard) for key, shard in weight_map.items()}

    def get_tensor(self, key: str) -> torch.Tensor:
        """The tensor saved under ``key``, or under ``key`` without the base model's prefix (a file of the bare
        base model, e.g. ``LlamaModel`` for a ``LlamaForCausalLM``). ``KeyError`` naming both keys if neither."""
        candidates = [key]
        if self.base_model_prefix and key.startswith(self.base_model_prefix + "."):
            candidates.append(key[len(self.base_model_prefix) + 1 :])
        for candidate in candidates:
            if candidate in self.file_of:
                with safe_open(self.file_of[candidate], framework="pt", device="cpu") as weights:
                    return weights.get_tensor(candidate)
        files = sorted(set(self.file_of.values()))
        raise KeyError(f"none of the keys {candidates} is in {files}; is it the original of this model?")


def _keys(path: str) -> list[str]:
    with safe_open(path, framework="pt", device="cpu") as weights:
        return list(weights.keys())


def _local_model_folder(base_model) -> str:
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "The provided model does not appear to be a transformers model loaded from a folder. In this case, "
            "you must pass the model_path argument that points to the safetensors file."
        )
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError) as error:
        raise ValueError(
            f"the base model {name!r} is neither a local folder nor in the local Hugging Face cache; pass "
            "model_path, the path of its safetensors file (nothing is downloaded)"
        ) from error


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    callback: Callable[[torch.nn.Module, str], bool] | None = None,
) -> None:
    """Set adapter ``adapter_name``'s factors on every bitsandbytes 4-bit layer of ``peft_model`` by LoftQ.

    ``model_path``: see ``_OriginalWeights``. ``callback(peft_model, module_name)`` (the name without
    ``base_model.model.``), if given, is called after each layer's replacement; when it returns False that layer's
    factors are put back (e.g. when the model's output did not get closer to the unquantized one). The factors
    keep their dtype and device. Mutates the factors only.

    Raises ``ValueError`` if bitsandbytes is not installed or no LoRA layer has a 4-bit base, ``TypeError`` if
    ``peft_model`` is not a ``PeftModel`` (its module names lack ``base_model.model.``), ``FileNotFoundError`` /
    ``KeyError`` if the original weights cannot be found, ``ValueError`` for an unknown ``adapter_name``.
    """
    try:
        from lora_engine.layers.bnb import LoraLinear4bit, dequantized_weight
    except ImportError as error:
        raise ValueError(
            "bitsandbytes must be installed and the model must be quantized in 4bits."
        ) from error

    original_weights = _OriginalWeights(peft_model, model_path)
    any_match = False
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear4bit):
            continue
        if not name.startswith(SAVED_PREFIX):
            raise TypeError("The passed model does not appear to be a valid PeftModel")
        any_match = True
        name = name[len(SAVED_PREFIX) :]
        if adapter_name not in module.lora_A:
            raise ValueError(
                f"{name!r} has no adapter {adapter_name!r}; its adapters are {sorted(module.lora_A.keys())}"
            )
        original = original_weights.get_tensor(name + ".weight")
        lora_A, lora_B = loftq_residual_factors(
            dequantized_weight(module.base_layer), original, module.r[adapter_name]
        )
        params = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = [param.data for param in params]
        for param, factor in zip(params, (lora_A, lora_B), strict=True):
            param.data = factor.to(device=param.device, dtype=param.dtype)
        if callback is not None and not callback(peft_model, name):
            for param, data in zip(params, before, strict=True):
                param.data = data
    if not any_match:
        raise ValueError("No bnb LoRA module found on the model")
