"""``lora_engine.tuners``: peft's ``peft.tuners`` for LoRA (``tuners.lora``, ``tuners.tuners_utils``).

Another method's tuner (``from peft.tuners import IA3Model``) raises an ``ImportError`` that says lora_engine is
LoRA only.
"""

from lora_engine.config import LoraConfig
from lora_engine.peft_names import unsupported_name
from lora_engine.tuner import LoraModel

__all__ = ["LoraConfig", "LoraModel"]


def __getattr__(name: str):
    raise unsupported_name(__name__, name)
