"""``LoftQConfig`` and the rules by which ``LoraConfig`` takes its ``loftq_config`` (peft 0.21.2's).

``init_lora_weights="loftq"`` needs a non-empty ``loftq_config`` (a ``LoftQConfig`` or its dict); it is stored as
a dict with both fields, which is what ``adapter_config.json`` holds. A ``loftq_config`` given with any other init
is dropped (set to ``{}``) with peft's warning. Plain values only (no torch), so ``config`` stays light.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

LOFTQ_BITS = (4, 8)  # NF4 (bitsandbytes 4-bit) or int8 (bitsandbytes' row-wise int8), as in peft


@dataclass
class LoftQConfig:
    """The settings of the LoftQ initialisation (``init_lora_weights="loftq"``); peft's fields and defaults.

    ``loftq_bits``: the quantization the base weight is initialised for, 4 (NF4) or 8 (int8).
    ``loftq_iter``: how many times quantization and the rank-r SVD of the residual alternate, at least 1.
    ``ValueError`` for any other value (peft raises the same, later: when the adapter is created).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.loftq_bits, bool) or self.loftq_bits not in LOFTQ_BITS:
            raise ValueError(
                f"loftq_config loftq_bits={self.loftq_bits!r}: only nf4 and int8 quantization is supported, "
                "use 4 or 8"
            )
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter <= 0:
            raise ValueError(
                f"loftq_config loftq_iter={self.loftq_iter!r}: the number of iterations must be an int greater "
                "than 0"
            )


def resolve_loftq_config(init_lora_weights: Any, loftq_config: Any) -> dict[str, Any]:
    """The ``loftq_config`` a ``LoraConfig`` stores: a checked dict of ``LoftQConfig``'s fields, or ``{}``.

    With ``init_lora_weights == "loftq"``: ``loftq_config`` must be a non-empty dict or a ``LoftQConfig`` (or any
    object whose ``vars()`` hold its fields, such as peft's); a missing field takes its default. ``ValueError`` if
    it is empty, not a mapping of ``LoftQConfig`` fields, or holds a bad value. With any other init: ``{}``,
    warning (as peft does) when a non-empty ``loftq_config`` is thereby ignored.
    """
    if init_lora_weights != "loftq":
        if loftq_config:
            warnings.warn(
                "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                stacklevel=4,
            )
        return {}
    if not loftq_config:
        raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
    if not isinstance(loftq_config, dict) and not hasattr(loftq_config, "__dict__"):
        raise ValueError(
            f"loftq_config={loftq_config!r:.200} must be a LoftQConfig or a dict of its fields "
            "(loftq_bits, loftq_iter)"
        )
    values = loftq_config if isinstance(loftq_config, dict) else vars(loftq_config)
    known = {config_field.name for config_field in fields(LoftQConfig)}
    unknown = sorted(str(key) for key in set(values) - known)
    if unknown:
        raise ValueError(
            f"loftq_config has keys {unknown} that are not LoftQConfig fields; its fields are {sorted(known)}"
        )
    return asdict(LoftQConfig(**values))
