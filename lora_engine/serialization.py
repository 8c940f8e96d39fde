"""Adapter files on disk: peft's key names, all-or-nothing saves, checked loads, and safe adapter names.

Saved keys are the model's state-dict keys with the adapter name removed
(``...q_proj.lora_A.default.weight`` → ``...q_proj.lora_A.weight``); each wrapper says how its saved
keys map to its in-memory ones (``adapter_state_keys``), and the same map is used in both directions.

How a save of the two files is all-or-nothing (``save_adapter_files``), while the files stay peft's:

1. both files are written completely, and fsynced, under temporary names (``TEMP_PREFIX``) in the folder;
   the safetensors metadata is ``{"format": "pt", "lora_engine_config_sha256": <digest>}``, the digest of the
   config fields that give the weights their meaning (``file_checks.bound_config_digest``); peft ignores
   the extra metadata key;
2. the old weights file is hard-linked (or copied) to a temporary backup;
3. the weights are renamed into place, then the config; the folder is fsynced; temporary files are removed.

A crash before step 3 leaves the old pair and some temporary files (ignored by loads, removed by the next
save). A crash between the two renames leaves the new weights beside the old config: the load sees the digest
mismatch and takes the complete new config that step 1 left beside it, so the folder reads as the complete new
adapter (peft, which cannot check, would read that torn pair during those microseconds' window). An error
raised during step 3 puts the old weights back from the backup before it propagates. ``.bin`` files
(``safe_serialization=False``) cannot carry the digest, so only the order and the rollback protect them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_engine.file_checks import (
    CONFIG_DIGEST_KEY,
    FLOAT_DTYPES,
    TEMP_PREFIX,
    AdapterFileError,
    bound_config_digest,
    read_safetensors_header,
)
from lora_engine.module_tree import named_modules_outside_adapters
from lora_engine.peft_format import BASE_ONLY_NAME, BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, SAVED_PREFIX
from lora_engine.state_tensors import state_tensor, state_tensors


def check_adapter_name(adapter_name: str) -> None:
    """Refuse names that are not plain, printable folder names: they would escape the save folder, break module
    keys, or (control and bidirectional-override characters) display as another name. ``"__base__"`` is the
    mixed-batch name of the base model, so no adapter may take it."""
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise ValueError(f"Adapter name must be a non-empty str, got {adapter_name!r}")
    bad = [char for char in ("/", "\\", ".", "\0") if char in adapter_name]
    if bad or adapter_name in ("..", "."):
        raise ValueError(
            f"Adapter name {adapter_name!r} contains {bad}: adapter names become folder names and module keys, "
            "so they may not contain '/', '\\', '.' or NUL"
        )
    if not adapter_name.isprintable():
        unprintable = sorted({f"U+{ord(char):04X}" for char in adapter_name if not char.isprintable()})
        raise ValueError(
            f"Adapter name {adapter_name!r} contains non-printable characters {unprintable} (control, "
            "bidirectional or format characters); use printable characters only"
        )
    if adapter_name == BASE_ONLY_NAME:
        raise ValueError(
            f"Adapter name {BASE_ONLY_NAME!r} is reserved: in adapter_names it selects the base model; pick another name"
        )


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failure leaves an existing ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = write_temp_file(path, write)
    try:
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_temp_file(path: Path, write: Callable[[str], None]) -> str:
    """Run ``write(tmp_path)`` on a new ``TEMP_PREFIX`` file beside ``path`` and fsync it; returns its path.

    The file gets the permissions a plain ``open()`` would give (umask). On failure it is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        write(tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())  # the bytes are on disk before any name points at them
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise
    return tmp_path


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (where the OS lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the renames are then as durable as they can be
    finally:
        os.close(fd)


def remove_temp_files(folder: Path) -> None:
    """Remove what interrupted saves left in ``folder`` (files starting with ``TEMP_PREFIX``)."""
    for leftover in folder.glob(f"{TEMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)


def save_adapter_files(
    folder: str | os.PathLike,
    config_dict: dict,
    state_dict: dict[str, torch.Tensor],
    safe_serialization: bool = True,
) -> None:
    """Write ``adapter_config.json`` (``config_dict``) and the weights into ``folder``, all or nothing.

    See the module docstring for the protocol. On an error the folder holds its previous pair and no temporary
    file; the error propagates.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Serialise before touching the disk: an unserialisable value fails here.
    config_text = json.dumps(config_dict, indent=2, sort_keys=True)
    tensors = _saveable(state_dict)
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: bound_config_digest(json.loads(config_text))}
    weights_path = folder / (SAFETENSORS_NAME if safe_serialization else BIN_NAME)
    if safe_serialization:
        write_weights = lambda tmp: save_file(tensors, tmp, metadata=metadata)  # noqa: E731
    else:
        write_weights = lambda tmp: torch.save(tensors, tmp)  # noqa: E731
    written: list[str] = []
    try:
        written.append(write_temp_file(weights_path, write_weights))
        written.append(
            write_temp_file(
                folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8")
            )
        )
        backup = _backup_of(weights_path)
        written.append(backup)
        os.replace(written[0], weights_path)
        try:
            os.replace(written[1], folder / CONFIG_NAME)
        except BaseException:
            _restore(weights_path, backup)
            raise
    except BaseException:
        for leftover in written:
            if leftover:
                Path(leftover).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    remove_temp_files(folder)


def _saveable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (tied weights are cloned), as safetensors requires."""
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    seen: set[int] = set()
    for key, value in tensors.items():
        if value.data_ptr() in seen:
            tensors[key] = value.clone()
        seen.add(value.data_ptr())
    return tensors


def _backup_of(weights_path: Path) -> str:
    """A ``TEMP_PREFIX`` hard link to (or, where links are refused, a copy of) the current weights; ``""``
    when there are none."""
    if not weights_path.is_file():
        return ""
    backup = weights_path.parent / f"{TEMP_PREFIX}{weights_path.name}.{os.getpid()}.backup"
    backup.unlink(missing_ok=True)
    try:
        os.link(weights_path, backup)
    except OSError:
        shutil.copy2(weights_path, backup)
    return str(backup)


def _restore(weights_path: Path, backup: str) -> None:
    """Undo the weights rename after the config rename failed: the old weights (or none) are back."""
    if backup:
        os.replace(backup, weights_path)
    else:
        weights_path.unlink(missing_ok=True)


def load_adapter_weights(
    folder: str, device: str | torch.device | None = None, allow_non_finite: bool = False
) -> dict[str, torch.Tensor]:
    """Read the adapter weights of ``folder``: safetensors first, else a ``.bin`` via ``weights_only`` loading.

    A ``.bin`` is never fully unpickled: ``torch.load(weights_only=True)`` refuses anything but tensors and
    plain containers. Raises ``AdapterFileError`` naming the file and key for a corrupt file, a value that is
    not a floating-point tensor, or (unless ``allow_non_finite``) a NaN or Inf.
    """
    folder_path = Path(folder)
    device = str(device) if device is not None else "cpu"
    if (folder_path / SAFETENSORS_NAME).is_file():
        path = folder_path / SAFETENSORS_NAME
        entries, _ = read_safetensors_header(path)
        for key, entry in entries.items():
            if entry.dtype not in FLOAT_DTYPES:
                raise AdapterFileError(path, _not_float_message(key, entry.dtype))
        try:
            weights = load_file(path, device=device)
        except Exception as error:  # safetensors' own errors name neither the file nor the fix
            raise AdapterFileError(
                path, f"cannot be read by safetensors ({error}); save the adapter again"
            ) from error
    elif (folder_path / BIN_NAME).is_file():
        path = folder_path / BIN_NAME
        weights = _load_bin(path, device)
    else:
        raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} in {str(folder_path)!r}")
    for key, value in weights.items():
        if not value.dtype.is_floating_point:
            raise AdapterFileError(path, _not_float_message(key, str(value.dtype)))
        if not allow_non_finite and not torch.isfinite(value).all():
            count = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(
                path,
                f"tensor {key!r} holds {count} NaN/Inf values; the adapter is broken (pass "
                "allow_non_finite=True to load it anyway)",
            )
    return weights


def _not_float_message(key: str, dtype: str) -> str:
    return (
        f"tensor {key!r} has dtype {dtype}; adapter weights must be floating point (F32, F16, BF16, F64 or F8), "
        "an integer or boolean tensor is not a LoRA weight"
    )


def _load_bin(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        weights = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"Refusing to load {str(path)!r}: it holds more than tensors, and adapters are "
            f"never fully unpickled (torch.load(weights_only=True) said: {err})"
        ) from err
    except Exception as error:
        raise AdapterFileError(
            path, f"cannot be read by torch.load ({error}); save the adapter again"
        ) from error
    if not isinstance(weights, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in weights.items()
    ):
        raise AdapterFileError(path, "does not hold a dict of str to tensors, as adapter_model.bin must")
    return weights


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
    base_keys_allowed = _base_keys_an_adapter_may_set(model, model.peft_config[adapter_name])
    to_load, unexpected = {}, []
    for key, value in peft_model_state_dict.items():
        key = _with_prefix(key, uses_prefix)
        target = key_map.get(key, key)
        current = state_tensor(model, target)
        if current is None:
            unexpected.append(key)
            continue
        if target == key and not base_keys_allowed(key):
            raise ValueError(
                f"Key {key!r} would overwrite the base model's own tensor: an adapter holds only LoRA factors, "
                "modules_to_save copies, biases its config trains (bias='all' or 'lora_only') and the full "
                "weights of targeted embedding layers"
            )
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


def _base_keys_an_adapter_may_set(model: torch.nn.Module, config) -> Callable[[str], bool]:
    """Whether a key peft saves under its in-memory name may be set by an adapter file: the biases its ``bias``
    setting trains, and the base weights of LoRA-targeted embedding layers (``save_embedding_layers``). The walk
    skips the adapters' own modules, so it stays flat in the number of adapters loaded."""
    allowed = set()
    for name, module in named_modules_outside_adapters(model):
        if not hasattr(type(module), "adapter_state_keys") or not hasattr(module, "base_layer"):
            continue
        if config.bias == "lora_only":
            allowed.add(f"{name}.base_layer.bias")
        if hasattr(module, "lora_embedding_A") or name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES:
            allowed.add(f"{name}.base_layer.weight")

    def is_allowed(key: str) -> bool:
        is_bias = key == "bias" or key.endswith(".bias")
        return key in allowed or (config.bias == "all" and is_bias)

    return is_allowed
