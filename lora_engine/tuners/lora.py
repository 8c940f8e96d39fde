"""``lora_engine.tuners.lora``: peft's ``peft.tuners.lora`` names, re-exported from where lora_engine keeps them.

``Linear`` is our LoRA wrapper of ``nn.Linear`` (and transformers' ``Conv1D``), ``Embedding`` of ``nn.Embedding``;
``LoraLayer`` is their base class, so ``isinstance(module, LoraLayer)`` finds every LoRA layer as in peft.
"""

from lora_engine.config import LoraConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.dense import LoraLinear as Linear
from lora_engine.layers.embedding import LoraEmbedding as Embedding
from lora_engine.loftq_config import LoftQConfig
from lora_engine.peft_names import unsupported_name
from lora_engine.tuner import LoraModel

__all__ = ["Embedding", "Linear", "LoftQConfig", "LoraConfig", "LoraLayer", "LoraModel"]


def __getattr__(name: str):
    raise unsupported_name(__name__, name)
