"""The checkpoint file that lets transformers' stock ``Trainer`` resume and reload a ``PeftModel``.

The Trainer recognises peft's ``PeftModel`` by ``isinstance`` only, so to it ours is a plain ``PreTrainedModel``
(transformers 5.24, ``trainer.py``):

- every save goes through ``model.save_pretrained(folder, state_dict=..., is_main_process=...)``, which writes
  peft's two adapter files; ``state_dict`` is None unless DeepSpeed or FSDP gathered the weights;
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` read only ``model.safetensors`` (or
  ``pytorch_model.bin``) and load it with ``model.load_state_dict(weights, strict=False)``: with adapter files
  alone, resuming raises and best-model loading looks for ``pytorch_model.bin``.

So each Trainer checkpoint folder (``checkpoint-<step>``) also gets a small ``model.safetensors`` that holds only
the trainable tensors, under their ``state_dict()`` keys, which that ``load_state_dict`` puts back. The folder of
a final ``Trainer.save_model`` is never a checkpoint folder and stays exactly peft's. Nothing here imports the
Trainer (it imports peft when peft is installed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lora_engine.serialization import atomic_write
from lora_engine.state_tensors import state_tensors

# transformers' SAFE_WEIGHTS_NAME, and its checkpoint folder pattern (trainer_utils._re_checkpoint): the Trainer
# resumes from, and picks its best model among, exactly the folders that match.
TRAINER_WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-\d+$")


def is_trainer_checkpoint_save(save_directory: str | os.PathLike, save_kwargs: Mapping) -> bool:
    """Whether a ``save_pretrained`` call is the Trainer saving a checkpoint: ``Trainer._save`` always passes
    ``state_dict=`` (even as None), and its checkpoint folders are named ``checkpoint-<step>``."""
    return "state_dict" in save_kwargs and bool(_CHECKPOINT_FOLDER.match(Path(save_directory).name))


def trainable_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict()`` keys of ``model``'s parameters that require grad (each shared parameter once)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def frozen_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict()`` keys that a checkpoint's ``model.safetensors`` leaves out: ``load_state_dict``
    reports exactly these as missing when it reloads one. Read through ``state_tensors``, not ``state_dict()``,
    which would alter a CPU-repacked 4-bit base; bitsandbytes' quant-state entries are not among them, as
    ``load_state_dict`` never reports those missing."""
    trainable = set(trainable_state_keys(model))
    return [key for key in state_tensors(model) if key not in trainable]


def save_trainable_weights(
    model: nn.Module, folder: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write ``folder/model.safetensors`` (atomically): ``model``'s trainable tensors under their ``state_dict()``
    keys, values taken from ``state_dict`` when given (DeepSpeed and FSDP gather them there; a key absent from it
    is left out). Starts no collective: only the main process calls it."""
    source = state_tensors(model) if state_dict is None else state_dict
    tensors = {key: source[key].detach().contiguous() for key in trainable_state_keys(model) if key in source}
    atomic_write(
        Path(folder) / TRAINER_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
