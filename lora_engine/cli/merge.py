"""``lora-engine merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR``: a standalone merged model.

The base is loaded in fp32 and the adapter's ``B A`` deltas are added to it in fp32, then the model is cast once
to the output dtype (default: the base checkpoint's). A bitsandbytes-quantized base (a folder whose config has a
bnb ``quantization_config``, or any base with ``--load-in-4bit``, which quantizes it as the demo's QLoRA does)
is merged with ``merge_and_unload_dequantized``: each quantized weight is dequantized and the delta added at
high precision, never requantized. The result is a plain transformers checkpoint, written into a temporary
folder beside OUT_DIR and renamed into place, plus the base folder's tokenizer if it has one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lora_engine.cli.errors import UsageError
from lora_engine.cli.inspect import read_adapter_config, read_tensor_infos

if TYPE_CHECKING:
    import torch

# --dtype choices: names of torch dtypes (torch is imported only when a merge runs, so --help answers at once).
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, metavar="MODEL_DIR", help="the base model folder")
    parser.add_argument(
        "--adapter", type=Path, required=True, metavar="ADAPTER_DIR", help="the adapter folder"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="new or empty folder")
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="quantize the base to NF4 first (for an adapter trained with QLoRA on a full-precision base)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the merged weights (default: the base's)",
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    dtype = getattr(torch, args.dtype) if args.dtype else None
    # Problems are reported as one UsageError line; transformers' progress bars and warnings would bury it.
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        merged_dtype = merge_adapter_into_base(args.base, args.adapter, args.out, args.load_in_4bit, dtype)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    print(
        f"merged {args.adapter} into {args.base}: {str(merged_dtype).removeprefix('torch.')} model in {args.out}"
    )
    return 0


def merge_adapter_into_base(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    load_in_4bit: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.dtype:
    """Write the merged model (and the base's tokenizer) to ``out_dir``; returns the dtype written.

    Raises ``UsageError`` for a missing or unreadable folder, a non-empty ``out_dir``, or an adapter that does
    not fit the base (unknown target modules, missing or extra keys, shape mismatches).
    """
    import torch

    base_config = _read_base_config(base_dir)
    read_adapter_config(adapter_dir)
    read_tensor_infos(adapter_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} already exists and is not an empty folder; choose a new --out")
    quantized = _is_bnb_quantized(base_config)
    output_dtype = dtype or _checkpoint_dtype(base_config)

    model = _load_with_adapter(base_dir, adapter_dir, quantize=load_in_4bit and not quantized)
    with torch.no_grad():
        if quantized or load_in_4bit:
            merged = model.base_model.merge_and_unload_dequantized(dtype=output_dtype)
        else:
            merged = model.merge_and_unload()
        merged.to(output_dtype)
    _save_atomically(merged, base_dir, out_dir)
    return output_dtype


def _read_base_config(base_dir: Path):
    from transformers import AutoConfig

    if not base_dir.is_dir():
        raise UsageError(f"base model folder {base_dir} does not exist")
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"{base_dir} has no config.json; is it a transformers model folder?")
    try:
        return AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot read the model config in {base_dir}: {_first_line(error)}") from error


def _is_bnb_quantized(config) -> bool:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _checkpoint_dtype(config) -> torch.dtype:
    """The dtype the base checkpoint was saved in (fp32 if the config does not say)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _load_with_adapter(base_dir: Path, adapter_dir: Path, quantize: bool):
    """The base (fp32, or as its folder's quantization config says, or NF4 if ``quantize``) on the CPU, with
    the adapter loaded; any mismatch between the two is a ``UsageError``."""
    import torch

    from lora_engine.config import PeftConfig
    from lora_engine.kbit import nf4_config
    from lora_engine.peft_model import PeftModel

    try:
        adapter_config = PeftConfig.from_pretrained(adapter_dir)
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(
            f"lora_engine cannot load the adapter in {adapter_dir}: {_first_line(error)}"
        ) from error
    model_class = _model_class(adapter_config.task_type)
    load_options = {"dtype": torch.float32, "device_map": {"": "cpu"}}
    if quantize:
        load_options["quantization_config"] = nf4_config(torch.float32)
    try:
        base = model_class.from_pretrained(base_dir, **load_options)
    except (OSError, ValueError, RuntimeError) as error:
        raise UsageError(f"cannot load the base model in {base_dir}: {_first_line(error)}") from error

    mismatch = f"the adapter in {adapter_dir} does not fit the base model in {base_dir}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing and unexpected keys are checked below, as errors
        try:
            model = PeftModel(base, adapter_config)
            keys = model.load_adapter(adapter_dir, "default")
        except (ValueError, RuntimeError) as error:
            raise UsageError(f"{mismatch}: {_first_line(error)}") from error
    if keys.missing_keys or keys.unexpected_keys:
        problem = (
            f"{len(keys.missing_keys)} adapter tensors missing (e.g. {keys.missing_keys[0]})"
            if keys.missing_keys
            else f"{len(keys.unexpected_keys)} tensors match no module (e.g. {keys.unexpected_keys[0]})"
        )
        raise UsageError(f"{mismatch}: {problem}")
    return model


def _model_class(task_type):
    """The transformers auto class for the adapter's ``task_type`` (causal LM when it has none)."""
    import transformers

    auto_class_names = {
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "FEATURE_EXTRACTION": "AutoModel",
    }
    name = auto_class_names.get(str(getattr(task_type, "value", task_type)), "AutoModelForCausalLM")
    return getattr(transformers, name)


def _save_atomically(model, base_dir: Path, out_dir: Path) -> None:
    """Save ``model`` and the base folder's tokenizer into a temporary sibling of ``out_dir``, then rename it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(partial)
        if any((base_dir / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base_dir).save_pretrained(partial)
        if out_dir.is_dir():
            out_dir.rmdir()  # checked empty above; rename cannot replace a folder
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
