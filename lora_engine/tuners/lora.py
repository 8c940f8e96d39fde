"""``lora_engine.tuners.lora``: peft's ``peft.tuners.lora`` names, re-exported from where lora_engine keeps them.

Each name is ours for the same concept, so ``isinstance(module, X)`` finds the modules peft's ``X`` finds:

- ``Linear`` is our LoRA wrapper of ``nn.Linear`` (and transformers' ``Conv1D``), ``Embedding`` of
  ``nn.Embedding``, ``MultiheadAttention`` of ``nn.MultiheadAttention``; DoRA layers are subclasses of these, as
  peft's DoRA layers are instances of its ``Linear``/``Embedding``/``Conv*``.
- ``Conv1d``, ``Conv2d``, ``Conv3d``: one wrapper class (``LoraConv``) serves every convolution here, so these
  three are views of it by kind: ``isinstance(module, Conv2d)`` holds for a LoRA wrapper of an ``nn.Conv2d`` only.
  They are for ``isinstance`` checks; wrappers are built by ``get_peft_model``/``add_adapter``.
  (peft 0.21.2 exports ``Conv2d``/``Conv3d`` here and keeps ``Conv1d`` and ``MultiheadAttention`` in
  ``peft.tuners.lora.layer``; we export all of them here.)
- ``ParamWrapper`` (``target_parameters``): our ``LoraParameters``. peft nests one wrapper per targeted
  parameter of a module; ours holds all of them in one, so with two parameters of one module peft finds two
  wrappers (the outer and its ``base_layer``) where we find one.
- ``LoraLayer`` is their base class, so ``isinstance(module, LoraLayer)`` finds every LoRA layer as in peft.
- ``LoftQConfig``, ``LoraConfig``, ``LoraModel``, ``EvaConfig``, ``CordaConfig``, ``get_eva_state_dict``,
  ``initialize_lora_eva_weights``, ``preprocess_corda``: the same objects as ``lora_engine``'s; ``eva`` and
  ``corda`` are ``lora_engine.initialization.eva`` and ``.corda`` (as attributes, not ``import ... .eva``: this
  is a module, not a package).

peft's other names here (quantization backends such as ``GPTQLoraLinear``, the configs of inits and variants we
do not implement, peft's internal submodules) raise an ``ImportError`` saying why.
"""

from torch import nn

from lora_engine.config import LoraConfig

# peft.tuners.lora.corda/.eva, as attributes (not a package)
from lora_engine.initialization import corda, eva
from lora_engine.initialization.corda import preprocess_corda
from lora_engine.initialization.data_driven_init_configs import CordaConfig, EvaConfig
from lora_engine.initialization.eva import get_eva_state_dict, initialize_lora_eva_weights
from lora_engine.initialization.loftq_config import LoftQConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.conv import LoraConv
from lora_engine.layers.dense import LoraLinear as Linear
from lora_engine.layers.embedding import LoraEmbedding as Embedding
from lora_engine.layers.multihead_attention import LoraMultiheadAttention as MultiheadAttention
from lora_engine.layers.parameters import LoraParameters as ParamWrapper
from lora_engine.peft_names import UnsupportedPeftName, unsupported_name
from lora_engine.tuner import LoraModel

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "CordaConfig",
    "Embedding",
    "EvaConfig",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "MultiheadAttention",
    "ParamWrapper",
    "corda",
    "eva",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_corda",
]


class _ConvKindView(type):
    """Metaclass of ``Conv1d``/``Conv2d``/``Conv3d``: an instance is a ``LoraConv`` whose base has that kind."""

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, LoraConv) and instance.conv_kind is cls.conv_kind


class _ConvView(LoraConv, metaclass=_ConvKindView):
    conv_kind: type[nn.Module]

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(
            f"lora_engine.tuners.lora.{type(self).__name__} is for isinstance checks; LoRA wrappers of "
            "convolutions are built by get_peft_model or add_adapter"
        )


class Conv1d(_ConvView):
    """A LoRA wrapper of an ``nn.Conv1d`` (``isinstance`` only)."""

    conv_kind = nn.Conv1d


class Conv2d(_ConvView):
    """A LoRA wrapper of an ``nn.Conv2d`` (``isinstance`` only)."""

    conv_kind = nn.Conv2d


class Conv3d(_ConvView):
    """A LoRA wrapper of an ``nn.Conv3d`` (``isinstance`` only)."""

    conv_kind = nn.Conv3d


# Names only peft.tuners.lora has (beyond the package-wide table in peft_names), with why we have none. Kept here,
# not in peft_names.UNSUPPORTED, because there they would make `hasattr(lora_engine, "model")` raise.
_NOT_HERE = {
    **dict.fromkeys(
        ("GPTQLoraLinear", "aqlm", "awq", "eetq", "gptq", "hqq", "inc", "te", "torchao", "tp_layer"),
        "LoRA on a quantization or tensor-parallel backend that lora_engine does not support (its quantized "
        "base is bitsandbytes 4-bit)",
    ),
    **dict.fromkeys(
        ("arrow", "conversion", "loraga", "monteclora", "velora"),
        "the module of a LoRA variant, initialization or conversion that lora_engine does not support",
    ),
    **dict.fromkeys(
        ("config", "dora", "layer", "model", "variants"),
        "an internal module of peft; lora_engine.tuners.lora re-exports the public classes themselves",
    ),
    **dict.fromkeys(
        ("is_bnb_4bit_available", "is_bnb_available", "is_eetq_available", "register_peft_method"),
        "a peft utility that peft.tuners.lora happens to import, not part of LoRA's API",
    ),
}


def __getattr__(name: str):
    if name in _NOT_HERE:
        raise UnsupportedPeftName(
            f"peft's peft.tuners.lora.{name} is {_NOT_HERE[name]}, so {__name__} has no {name}", name=name
        )
    raise unsupported_name(__name__, name)
