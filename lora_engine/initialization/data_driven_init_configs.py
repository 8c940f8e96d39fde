"""The settings of peft 0.21's two data-driven LoRA initialisations: ``EvaConfig`` (``init_lora_weights="eva"``)
and ``CordaConfig`` (``init_lora_weights="corda"``), with peft's fields, defaults and checks.

``LoraConfig`` holds one of each (or None); ``adapter_config.json`` stores them as plain dicts, as peft does, and
``as_sub_config`` turns such a dict back into the class (keys that are not fields are dropped, as in peft).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r}: must be True or False")


@dataclass
class EvaConfig:
    """EVA (Explained Variance Adaptation): ``lora_A`` of each layer starts as the top right-singular vectors of
    that layer's inputs on a dataset (``initialize_lora_eva_weights``), and the rank budget ``r × layers`` is
    redistributed by explained variance.

    ``rho`` (≥ 1): a layer gets at most ``round(r·rho)`` components. ``tau`` (in [0, 1]): the incremental SVD of a
    layer stops once the cosine similarity of its components between two batches reaches it. ``use_label_mask``:
    positions whose ``labels`` equal ``label_mask_value`` are left out of the SVD. ``whiten``: components are
    divided by the square root of their singular values. ``adjust_scaling_factors``: a layer whose rank changed
    gets ``lora_alpha · new_rank / r``, so its scaling stays ``lora_alpha / r``.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not _is_number(self.rho) or self.rho < 1.0:
            raise ValueError(f"`rho` must be >= 1.0, got EvaConfig.rho={self.rho!r}")
        if not _is_number(self.tau) or self.tau < 0.0 or self.tau > 1.0:
            raise ValueError(f"`tau` must be between 0.0 and 1.0., got EvaConfig.tau={self.tau!r}")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            _check_bool("EvaConfig", name, getattr(self, name))
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise ValueError(f"EvaConfig.label_mask_value={self.label_mask_value!r}: must be an int")


@dataclass
class CordaConfig:
    """CorDA (context-oriented decomposition adaptation): ``preprocess_corda`` collects each target layer's input
    covariance ``C`` on a dataset, takes the SVD of ``W C``, and the adapter starts from its largest (``"ipm"``,
    instruction-previewed) or smallest (``"kpm"``, knowledge-preserved) ``r`` components; the base weight keeps
    the rest (``W − s·B A``), so the model's output is unchanged at the start.

    ``cache_file``: where the cropped SVD is stored and read back; ``covariance_file``: where the covariance
    matrices are. Both are safetensors files written by lora_engine (peft pickles them with ``torch.save``); a
    file peft wrote is read with ``torch.load(weights_only=True)``, which loads tensors and nothing else.
    ``verbose``: show progress. ``use_float16_for_covariance``: accumulate the covariance in the inputs' dtype
    instead of float32. ``prune_temporary_fields``: delete the attributes preprocessing leaves on the layers.
    """

    cache_file: str | os.PathLike | None = None
    covariance_file: str | os.PathLike | None = None
    corda_method: str | None = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"CordaConfig.{name}={value!r}: must be a file path or None")
        if self.corda_method not in ("ipm", "kpm", None):
            raise ValueError(
                f"CordaConfig.corda_method={self.corda_method!r}: must be 'ipm' or 'kpm' (None only to read cache_file)"
            )
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            _check_bool("CordaConfig", name, getattr(self, name))


def as_sub_config(name: str, value: Any, config_class: type) -> Any:
    """``value`` (None, a ``config_class`` or a dict read from a file) as None or a ``config_class``; dict keys
    that are not fields are dropped, as peft does. ``TypeError`` naming ``name`` for anything else."""
    if value is None or isinstance(value, config_class):
        return value
    if isinstance(value, dict):
        field_names = {
            config_field.name for config_field in dataclasses.fields(config_class) if config_field.init
        }
        return config_class(**{key: item for key, item in value.items() if key in field_names})
    raise TypeError(
        f"{name}={value!r:.200}: must be a {config_class.__name__}, a dict of its fields, or None"
    )
