"""``lora-engine inspect ADAPTER_DIR``: what an adapter folder holds, read from its files alone.

Reads ``adapter_config.json`` as plain JSON (so adapters with options lora_engine does not support, such as KaSA,
can still be inspected, with a warning naming each such option) and the tensor names, shapes and dtypes from the safetensors header, without reading
the tensors. A ``.bin`` adapter is read with ``torch.load(weights_only=True)``. Works on adapters made by peft
or by lora_engine; no base model is needed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

from lora_engine.cli.errors import UsageError
from lora_engine.file_checks import AdapterFileError, read_config_dict, read_safetensors_header
from lora_engine.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, SAVED_PREFIX
from lora_engine.unsupported_options import unsupported_options

# ".../q_proj.lora_A.weight" (Linear), ".../embed_tokens.lora_embedding_A" (Embedding).
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<factor>[AB])(?:\.weight)?$")
# Adapter tensors besides the factors: DoRA magnitudes and lora_bias biases of lora_B.
EXTRA_ADAPTER_KEYS = {
    "DoRA magnitude vectors": re.compile(r".+\.lora_magnitude_vector$"),
    "lora_B biases (lora_bias)": re.compile(r".+\.lora_B\.bias$"),
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter_dir", type=Path, metavar="ADAPTER_DIR", help="a folder saved by save_pretrained"
    )


def run(args: argparse.Namespace) -> int:
    print(describe_adapter(args.adapter_dir))
    return 0


def describe_adapter(folder: Path) -> str:
    """The report ``inspect`` prints for ``folder``. Raises ``UsageError`` if it is not an adapter folder."""
    config = read_adapter_config(folder)
    weights_path, tensors = read_tensor_infos(folder)
    ranks, lora_keys, others = _group_lora_tensors(tensors)
    lines = [
        f"adapter: {folder}",
        f"  peft_type: {config.get('peft_type')}   task_type: {config.get('task_type')}",
        f"  base model: {config.get('base_model_name_or_path')}",
        f"  r: {config.get('r')}   lora_alpha: {config.get('lora_alpha')}   use_rslora: {config.get('use_rslora')}"
        f"   lora_dropout: {config.get('lora_dropout')}   bias: {config.get('bias')}",
    ]
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            lines.append(f"  {key}: {json.dumps(config[key])}")
    lines.append(f"  target_modules: {_format_targets(config.get('target_modules'))}")
    if config.get("modules_to_save"):
        lines.append(f"  modules_to_save: {config['modules_to_save']}")
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            lines.append(f"  {option}: true")
    for option in unsupported_options(config):
        lines.append(
            f"  warning: {option} is not supported yet by lora_engine; this adapter cannot be loaded"
        )
    if config.get("peft_type", "LORA") != "LORA":
        lines.append(
            f"  warning: peft_type={config.get('peft_type')!r}; lora_engine loads LORA adapters only"
        )

    lines.append(f"targeted modules: {len(ranks)}")
    for pattern, group_ranks, count in _module_patterns(ranks):
        rank_text = ", ".join(f"r={rank}" for rank in sorted(group_ranks, key=lambda rank: rank or 0))
        lines.append(f"  {pattern}  x{count}  {rank_text}")
    lora_parameters = sum(tensors[key].numel for key in lora_keys)
    extras = {
        label: [key for key in others if pattern.match(key)] for label, pattern in EXTRA_ADAPTER_KEYS.items()
    }
    others = [key for key in others if not any(key in keys for keys in extras.values())]
    other_parameters = sum(tensors[key].numel for key in others)
    lines.append(f"parameters: {sum(info.numel for info in tensors.values()):,} in {len(tensors)} tensors")
    lines.append(f"  LoRA factors: {lora_parameters:,}")
    for label, keys in extras.items():
        if keys:
            lines.append(f"  {label}: {sum(tensors[key].numel for key in keys):,} in {len(keys)}")
    if others:
        lines.append(f"  other tensors (modules_to_save, biases, ...): {other_parameters:,} in {len(others)}")
    dtypes = Counter(info.dtype for info in tensors.values())
    lines.append(
        "dtypes: " + ", ".join(f"{dtype} ({count} tensors)" for dtype, count in sorted(dtypes.items()))
    )
    config_size = (folder / CONFIG_NAME).stat().st_size
    lines.append(
        f"files: {weights_path.name} {_format_bytes(weights_path.stat().st_size)}, "
        f"{CONFIG_NAME} {_format_bytes(config_size)}"
    )
    return "\n".join(lines)


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of ``folder`` as a dict; ``UsageError`` if missing or not a JSON object."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"{folder} has no {CONFIG_NAME}; is it an adapter folder?")
    try:
        return read_config_dict(path)
    except AdapterFileError as error:
        raise UsageError(str(error)) from error


def read_tensor_infos(folder: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """``(weights file, {saved key: shape and dtype})`` of the adapter in ``folder``, safetensors first."""
    safetensors_path = folder / SAFETENSORS_NAME
    if safetensors_path.is_file():
        return safetensors_path, _safetensors_header(safetensors_path)
    bin_path = folder / BIN_NAME
    if bin_path.is_file():
        import torch

        try:
            state_dict = torch.load(bin_path, map_location="meta", weights_only=True)
        except Exception as error:
            raise UsageError(f"{bin_path} is not a weights-only torch file: {error}") from error
        return bin_path, {
            key: TensorInfo(tuple(value.shape), str(value.dtype).removeprefix("torch."))
            for key, value in state_dict.items()
        }
    raise UsageError(f"{folder} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor shapes and dtypes from a safetensors header (``file_checks`` reads and validates it; no torch)."""
    try:
        entries, _ = read_safetensors_header(path)
    except AdapterFileError as error:
        raise UsageError(str(error)) from error
    return {key: TensorInfo(entry.shape, entry.dtype) for key, entry in entries.items()}


def _group_lora_tensors(tensors: dict[str, TensorInfo]) -> tuple[dict[str, int | None], list[str], list[str]]:
    """``({module name: rank}, LoRA keys, other keys)``; module names lose the ``base_model.model.`` prefix.

    A module's rank is the row count of its ``lora_A`` (``lora_embedding_A`` too: ``(r, num_embeddings)``);
    ``None`` if the file has only its ``lora_B``.
    """
    ranks: dict[str, int | None] = {}
    lora_keys, others = [], []
    for key, info in tensors.items():
        match = LORA_KEY.match(key)
        if not match:
            others.append(key)
            continue
        lora_keys.append(key)
        module_name = match["module"].removeprefix(SAVED_PREFIX)
        if match["factor"] == "A":
            ranks[module_name] = info.shape[0]
        else:
            ranks.setdefault(module_name, None)
    return ranks, lora_keys, others


def _module_patterns(ranks: dict[str, int | None]) -> list[tuple[str, set, int]]:
    """Targeted modules grouped by name with layer numbers replaced by ``*``: ``(pattern, ranks, count)``."""
    groups: dict[str, tuple[set, list[str]]] = {}
    for module_name in sorted(ranks, key=_natural_key):
        pattern = re.sub(r"\.\d+\.", ".*.", module_name)
        group_ranks, members = groups.setdefault(pattern, (set(), []))
        members.append(module_name)
        group_ranks.add(ranks[module_name])
    return [(pattern, group_ranks, len(members)) for pattern, (group_ranks, members) in groups.items()]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _format_targets(targets) -> str:
    if isinstance(targets, list):
        return ", ".join(sorted(targets))
    return repr(targets)


def _format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
