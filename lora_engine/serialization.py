"""Adapter files on disk: peft's key names, atomic safetensors writes, safe loads, and safe adapter names.

Saved keys are the model's state-dict keys with the adapter name removed
(``...q_proj.lora_A.default.weight`` → ``...q_proj.lora_A.weight``); each wrapper says how its saved
keys map to its in-memory ones (``adapter_state_keys``), and the same map is used in both directions.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_engine.module_tree import named_modules_outside_adapters
from lora_engine.peft_format import BIN_NAME, SAFETENSORS_NAME, SAVED_PREFIX
from lora_engine.state_tensors import state_tensor, state_tensors


def check_adapter_name(adapter_name: str) -> None:
    """Refuse names that are not plain folder names: they would escape the save folder or break module keys."""
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise ValueError(f"Adapter name must be a non-empty str, got {adapter_name!r}")
    bad = [char for char in ("/", "\\", ".", "\0") if char in adapter_name]
    if bad or adapter_name in ("..", "."):
        raise ValueError(
            f"Adapter name {adapter_name!r} contains {bad}: adapter names become folder names and module keys, "
            "so they may not contain '/', '\\', '.' or NUL"
        )


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failure leaves an existing ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp creates the file 0600; give the final file the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        write(tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise


def save_adapter_weights(
    state_dict: dict[str, torch.Tensor], folder: str, safe_serialization: bool = True
) -> None:
    """Write ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), or ``adapter_model.bin``, atomically."""
    # Tensors must be contiguous and must not share storage (tied weights) for safetensors.
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    seen: set[int] = set()
    for key, value in tensors.items():
        if value.data_ptr() in seen:
            tensors[key] = value.clone()
        seen.add(value.data_ptr())
    if safe_serialization:
        atomic_write(
            Path(folder) / SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
        )
    else:
        atomic_write(Path(folder) / BIN_NAME, lambda tmp: torch.save(tensors, tmp))


def load_adapter_weights(folder: str, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read the adapter weights of ``folder``: safetensors first, else a ``.bin`` via ``weights_only`` loading.

    A ``.bin`` is never fully unpickled: ``torch.load(weights_only=True)`` refuses anything but tensors and
    plain containers.
    """
    folder_path = Path(folder)
    device = str(device) if device is not None else "cpu"
    if (folder_path / SAFETENSORS_NAME).is_file():
        return load_file(folder_path / SAFETENSORS_NAME, device=device)
    if (folder_path / BIN_NAME).is_file():
        try:
            return torch.load(folder_path / BIN_NAME, map_location=device, weights_only=True)
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(
                f"Refusing to load {str(folder_path / BIN_NAME)!r}: it holds more than tensors, and adapters are "
                f"never fully unpickled (torch.load(weights_only=True) said: {err})"
            ) from err
    raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} in {str(folder_path)!r}")


def adapter_folder(save_directory: str, adapter_name: str) -> Path:
    """peft's layout: the ``default`` adapter at the root, any other in ``<save_directory>/<adapter_name>``."""
    check_adapter_name(adapter_name)
    root = Path(save_directory)
    folder = root if adapter_name == "default" else root / adapter_name
    if folder.resolve().parent != root.resolve() and folder.resolve() != root.resolve():
        raise ValueError(f"Adapter name {adapter_name!r} would write outside {str(root)!r}")
    return folder


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_key_map(model: torch.nn.Module, adapter_name: str) -> dict[str, str]:
    """Saved key → in-memory state-dict key of ``adapter_name``'s tensors, both relative to ``model``.

    Covers the LoRA factors and ``modules_to_save`` copies: every module with an ``adapter_state_keys``
    method (the wrappers in ``layers/``) contributes its own map.
    """
    key_map = {}
    for module_name, module in named_modules_outside_adapters(model):
        if not hasattr(type(module), "adapter_state_keys"):
            continue
        prefix = f"{module_name}." if module_name else ""
        for saved, in_memory in module.adapter_state_keys(adapter_name).items():
            key_map[prefix + saved] = prefix + in_memory
    return key_map


def _extra_saved_keys(
    model: torch.nn.Module, config, state_keys: list[str], save_embedding_layers
) -> list[str]:
    """Keys saved as they are in memory: trained biases and, for targeted embeddings, the full embedding."""
    keys = []
    if config.bias == "all":
        keys += [key for key in state_keys if key == "bias" or key.endswith(".bias")]
    elif config.bias == "lora_only":
        keys += [key for key in state_keys if key.endswith(".base_layer.bias")]
    targets = config.target_modules
    if isinstance(targets, str):
        embedding_targeted = any(name in targets for name in EMBEDDING_LAYER_NAMES)
    else:
        embedding_targeted = any(name in (targets or ()) for name in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers is True or (save_embedding_layers == "auto" and embedding_targeted):
        names = {name for name, module in model.named_modules() if hasattr(module, "lora_embedding_A")}
        keys += [f"{name}.base_layer.weight" for name in names if f"{name}.base_layer.weight" in state_keys]
    return keys


def get_peft_model_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under peft's saved key names (no adapter name in them).

    ``model`` is a ``PeftModel`` (keys start with ``base_model.model.``) or a model with injected adapters.
    Values come from ``state_dict`` when given (e.g. gathered by DeepSpeed/FSDP), else from ``model``.
    With ``save_embedding_layers="auto"`` the full weights of LoRA-targeted embedding layers are included
    when ``target_modules`` names ``embed_tokens`` or ``lm_head``, as peft does.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"Adapter {adapter_name!r} not found; available adapters: {sorted(model.peft_config)}"
        )
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = state_tensors(model)
    key_map = adapter_key_map(model, adapter_name)
    saved = {saved_key: state_dict[in_memory] for saved_key, in_memory in key_map.items()}
    for key in _extra_saved_keys(model, config, list(state_dict), save_embedding_layers):
        saved[key] = state_dict[key]
    return saved


def set_peft_model_state_dict(
    model: torch.nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """Copy saved adapter tensors into the (already injected) adapter ``adapter_name`` of ``model``.

    Keys may carry the ``base_model.model.`` prefix or not, whatever ``model`` uses. A shape mismatch is a
    ``ValueError`` naming the key and both shapes, unless ``ignore_mismatched_sizes`` (then it is skipped with
    a warning). Returns ``(missing_keys, unexpected_keys)`` restricted to this adapter's keys.
    """
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(
            f"Adapter {adapter_name!r} is not injected in the model; add it before loading weights"
        )
    key_map = adapter_key_map(model, adapter_name)
    # The checkpoint's keys are looked up one by one (not in state_tensors(model)) and loaded module by
    # module (not by model.load_state_dict): both whole-model walks would grow with every adapter loaded.
    wrapped = model._modules.get("base_model")
    uses_prefix = (
        wrapped is not None and "model" in wrapped._modules
    )  # a PeftModel: keys "base_model.model..."
    to_load, unexpected = {}, []
    for key, value in peft_model_state_dict.items():
        key = _with_prefix(key, uses_prefix)
        target = key_map.get(key, key)
        current = state_tensor(model, target)
        if current is None or (target == key and not _is_plain_saved_key(key)):
            unexpected.append(key)
            continue
        expected_shape = current.shape
        if value.shape != expected_shape:
            message = (
                f"Shape mismatch for {key!r}: the checkpoint has {tuple(value.shape)}, the model expects "
                f"{tuple(expected_shape)} (was the adapter trained on another base model, or with another r?)"
            )
            if not ignore_mismatched_sizes:
                raise ValueError(message)
            warnings.warn(message + "; skipped because ignore_mismatched_sizes=True", stacklevel=2)
            continue
        to_load[target] = value
    _load_module_by_module(model, to_load, assign=low_cpu_mem_usage)
    missing = [in_memory for in_memory in key_map.values() if in_memory not in to_load]
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def _load_module_by_module(model: torch.nn.Module, tensors: dict[str, torch.Tensor], assign: bool) -> None:
    """``model.load_state_dict(tensors, strict=False, assign=assign)`` for keys that all exist, run on each
    owning module only (its own load hooks included), so the cost is that of ``tensors``, not of ``model``."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_name, _, leaf = key.rpartition(".")
        by_module.setdefault(module_name, {})[leaf] = value
    for module_name, own in by_module.items():
        model.get_submodule(module_name).load_state_dict(own, strict=False, assign=assign)


def _with_prefix(key: str, uses_prefix: bool) -> str:
    if uses_prefix and not key.startswith(SAVED_PREFIX):
        return SAVED_PREFIX + key
    if not uses_prefix and key.startswith(SAVED_PREFIX):
        return key.removeprefix(SAVED_PREFIX)
    return key


def _is_plain_saved_key(key: str) -> bool:
    """Keys peft saves under their in-memory name: biases and full embedding weights."""
    return key.endswith(".bias") or key == "bias" or key.endswith(".base_layer.weight")
