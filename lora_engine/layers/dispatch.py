"""Which wrapper a base module gets: the one place that maps a layer kind (and a variant) to its class in
``layers/``. A new layer kind adds one branch to ``wrap_module``; a new variant its promotion, as ``as_dora`` does.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.conv import CONV_KINDS, LoraConv
from lora_engine.layers.dense import LoraLinear
from lora_engine.layers.dora import DORA_CLASSES, DoraMixin
from lora_engine.layers.embedding import LoraEmbedding
from lora_engine.layers.multihead_attention import LoraMultiheadAttention


@contextmanager
def naming_module(module_name: str):
    """Re-raise a layer's ``ValueError`` with the name of the module it came from in front."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{module_name}: {err}") from err


def wrap_module(module_name: str, module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for the base ``module`` (not yet holding an adapter); ``ValueError`` naming
    ``module_name`` for a kind lora_engine cannot wrap."""
    if type(module).__module__.startswith("bitsandbytes"):
        from lora_engine.layers.bnb import wrap_bnb_linear  # imports bitsandbytes only for quantized models

        return wrap_bnb_linear(module_name, module)
    if isinstance(module, nn.Linear | Conv1D):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, CONV_KINDS):
        return LoraConv(module)
    if isinstance(module, nn.MultiheadAttention):
        with naming_module(module_name):
            return LoraMultiheadAttention(module)
    raise ValueError(
        f"Target module {module_name!r} is a {type(module).__name__}; lora_engine supports LoRA on "
        "torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d and "
        "torch.nn.MultiheadAttention"
    )


def as_dora(module_name: str, module: LoraLayer) -> DoraMixin:
    """The wrapper of ``module_name`` able to hold a DoRA adapter: a plain wrapper is promoted in place."""
    if isinstance(module, DoraMixin):
        return module
    dora_class = DORA_CLASSES.get(type(module))
    if dora_class is None and type(module).__module__ == "lora_engine.layers.bnb":
        from lora_engine.layers.dora_bnb import DORA_BNB_CLASSES  # bitsandbytes is already imported then

        dora_class = DORA_BNB_CLASSES.get(type(module))
    if dora_class is None:
        raise ValueError(
            f"use_dora=True on {module_name!r} ({type(module.base_layer).__name__}): DoRA is not supported yet by "
            "lora_engine on this layer kind; it supports DoRA on torch.nn.Linear, transformers Conv1D, "
            "torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d and bitsandbytes Linear4bit"
        )
    return dora_class.promote(module)


def check_lora_bias(module_name: str, module: LoraLayer) -> None:
    """``lora_bias`` needs a module ``lora_B`` on an unquantized base (peft's bnb merges also drop the scaling)."""
    if type(module) not in (LoraLinear, LoraConv):
        raise ValueError(
            f"lora_bias=True on {module_name!r} ({type(module.base_layer).__name__}): lora_bias is not supported "
            "yet by lora_engine on this layer kind; it supports it on torch.nn.Linear, transformers Conv1D and "
            "torch.nn.Conv1d/Conv2d/Conv3d"
        )
    if getattr(module.base_layer, "bias", None) is None:
        warnings.warn(
            f"`lora_bias=True` was passed but {module_name!r} ({type(module.base_layer).__name__}) has no bias. "
            "This means that merging LoRA weights won't be possible.",
            stacklevel=4,
        )
