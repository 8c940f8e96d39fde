"""Reading an adapter folder defensively: every problem is an ``AdapterFileError`` that names the file.

What is checked before any tensor is allocated:

- ``adapter_config.json``: UTF-8, JSON (nesting depth included), a JSON object;
- ``adapter_model.safetensors``: the header is parsed here, not by safetensors, so a truncated file, a bad
  length field, a non-JSON header, an unknown dtype, a negative or absurd shape, or byte ranges that do not fit
  the file are named with the key at fault; only then does safetensors read the tensors;
- the pair: a file we saved carries, in its safetensors metadata, the SHA-256 of the config fields that give
  the weights their meaning (``bound_config_digest``). A pair whose config does not match is refused, unless
  an interrupted save left the matching config beside it (see ``serialization.save_adapter_files``), which is
  then used: the folder reads as the complete new adapter. Files written by peft carry no digest and load as
  before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from lora_engine.peft_format import CONFIG_NAME, SAFETENSORS_NAME

# Temporary files of an unfinished save start with this; loads ignore them (but for recovery), and the next
# successful save of the folder removes them.
TEMP_PREFIX = ".lora-engine-tmp-"
# Key of the safetensors metadata entry binding the weights to their config; peft ignores extra metadata.
CONFIG_DIGEST_KEY = "lora_engine_config_sha256"
# The config keys that change which tensors an adapter has or what they compute (peft's list, research notes
# §2.4); only these are bound to the weights, so editing e.g. base_model_name_or_path or adding a key from a
# newer peft keeps a pair valid. Not `init_lora_weights`: the saved factors overwrite the init, and peft's own
# PiSSA/OLoRA conversion rewrites that field in a saved folder (init_conversion does the same).
BOUND_FIELDS = frozenset(
    {
        "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
        "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "bias", "fan_in_fan_out",
        "use_dora", "lora_bias", "trainable_token_indices", "target_parameters", "layer_replication",
    }
)  # fmt: skip
# safetensors' own limit on the header length (100 MB); anything larger is a corrupt length field.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})


class AdapterFileError(ValueError):
    """An adapter file that cannot be used; ``path`` is the file, and the message starts with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path!r}: {problem}")


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; ``AdapterFileError`` for bytes that are not UTF-8, not JSON, nested too
    deeply for Python's parser, or not an object. ``FileNotFoundError`` when it does not exist."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(
            path, f"is not UTF-8 text ({error}); adapter_config.json must be UTF-8 JSON"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFileError(path, f"is not valid JSON: {error}") from None
    except RecursionError:
        raise AdapterFileError(
            path, "is nested too deeply to parse; adapter_config.json is a flat JSON object"
        ) from None
    if not isinstance(value, dict):
        raise AdapterFileError(
            path, f"holds a JSON {type(value).__name__}, not a JSON object of config fields"
        )
    return value


def bound_config_digest(config_dict: dict[str, Any]) -> str:
    """SHA-256 of the fields of ``config_dict`` that give adapter weights their meaning (``BOUND_FIELDS``), in
    a canonical JSON form: key order and the order of name lists do not matter."""

    def canonical(key: str, value: Any) -> Any:
        if (
            isinstance(value, list)
            and all(isinstance(item, str) for item in value)
            and key != "layers_pattern"
        ):
            return sorted(value)  # sets of module names: peft writes them in arbitrary order
        return value

    bound = {key: canonical(key, value) for key, value in config_dict.items() if key in BOUND_FIELDS}
    text = json.dumps(bound, sort_keys=True, ensure_ascii=True, allow_nan=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TensorEntry:
    """One tensor as a safetensors header declares it: ``dtype`` (safetensors' name), ``shape``, byte range."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``(tensors, metadata)`` declared by the safetensors file ``path``, fully validated against its size.

    Raises ``AdapterFileError`` naming the file (and the key at fault) for: a file shorter than its length
    field or header, a header length over 100 MB, a header that is not a UTF-8 JSON object, an entry without
    a known dtype, a shape of non-negative ints or ``[start, end]`` offsets, a byte range whose length is not
    ``numel · itemsize`` or that leaves the file, overlapping or gapped ranges, and metadata that is not
    ``{str: str}``. Nothing is allocated beyond the header bytes.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise AdapterFileError(path, f"is truncated: {size} bytes, shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > _MAX_HEADER_BYTES or 8 + header_length > size:
            raise AdapterFileError(
                path,
                f"declares a {header_length}-byte header but the file has {size} bytes: it is truncated or its "
                "length field is corrupt; save the adapter again",
            )
        header_bytes = file.read(header_length)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise AdapterFileError(
            path, f"has a corrupt header (not UTF-8 JSON: {error}); save the adapter again"
        ) from None
    if not isinstance(header, dict):
        raise AdapterFileError(path, f"has a corrupt header: a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise AdapterFileError(path, f"has __metadata__ {metadata!r:.200}; it must map str to str")
    data_size = size - 8 - header_length
    tensors = {key: _tensor_entry(path, key, entry, data_size) for key, entry in header.items()}
    position = 0
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            raise AdapterFileError(
                path,
                f"tensor {key!r} starts at byte {entry.start} of the data, expected {position}: ranges overlap or leave gaps",
            )
        position = entry.end
    if position != data_size:
        raise AdapterFileError(
            path,
            f"has {data_size} data bytes but its tensors cover {position}: the file is truncated or padded",
        )
    return tensors, metadata


def _tensor_entry(path, key: str, entry: Any, data_size: int) -> TensorEntry:
    if not isinstance(entry, dict):
        raise AdapterFileError(
            path, f"header entry {key!r} is {entry!r:.100}, not an object with dtype/shape/data_offsets"
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise AdapterFileError(
            path, f"tensor {key!r} has unknown dtype {dtype!r:.50}; expected one of {sorted(_DTYPE_BYTES)}"
        )
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise AdapterFileError(
            path, f"tensor {key!r} has shape {shape!r:.100}; expected a list of non-negative ints"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise AdapterFileError(
            path,
            f"tensor {key!r} has data_offsets {offsets!r:.100}; expected [start, end] within the {data_size} data bytes (the file is truncated, or its header corrupt)",
        )
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise AdapterFileError(
            path,
            f"tensor {key!r} ({dtype}, shape {tuple(shape)}) needs {expected} bytes but its range holds "
            f"{offsets[1] - offsets[0]}: the header is corrupt",
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def matching_config(folder: Path, weights_metadata: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """The config that belongs with ``folder``'s safetensors weights, as ``(path, parsed dict)``.

    ``adapter_config.json`` when the weights carry no digest (peft's files) or the digest matches it;
    otherwise a complete config that an interrupted save left beside it (``TEMP_PREFIX`` files) whose digest
    matches. Raises ``AdapterFileError`` naming both files when neither matches.
    """
    config_path = folder / CONFIG_NAME
    config_dict = read_config_dict(config_path)
    digest = weights_metadata.get(CONFIG_DIGEST_KEY)
    if digest is None or bound_config_digest(config_dict) == digest:
        return config_path, config_dict
    for candidate in sorted(folder.glob(f"{TEMP_PREFIX}{CONFIG_NAME}*")):
        try:
            candidate_dict = read_config_dict(candidate)
        except (OSError, AdapterFileError):
            continue  # a half-written leftover: not the one
        if bound_config_digest(candidate_dict) == digest:
            return candidate, candidate_dict
    raise AdapterFileError(
        config_path,
        f"does not belong with {str(folder / SAFETENSORS_NAME)!r}: the weights were saved with a config whose "
        f"r/alpha/targets differ (digest {digest[:12]}… in its metadata {CONFIG_DIGEST_KEY!r}). The folder holds "
        "a torn or hand-edited pair; save the adapter again, or, if you changed the config on purpose, pass it "
        "explicitly: PeftModel.from_pretrained(model, folder, config=LoraConfig.from_pretrained(folder))",
    )
