"""``save_pretrained(path_initial_model_for_weight_conversion=...)``: a PiSSA or OLoRA adapter, whose init
replaced the base weight ``W`` by the residual ``W_res = W − s·B₀A₀``, saved as a plain LoRA adapter for ``W``.

After training, ``W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B | −B₀][A ; A₀]``: the saved adapter has rank ``2r``,
``lora_A = cat(A, A₀)`` and ``lora_B = cat(B, −B₀)``, and ``lora_alpha`` doubled (×√2 with rslora) so that the
scaling stays ``s``. ``A₀, B₀`` are read from the folder the untrained adapter was saved to, as peft does: its
config is first rewritten with ``init_lora_weights=True`` (so that loading it does not decompose the residual
again), it is loaded as a temporary adapter named after the folder, and deleted afterwards.
"""

from __future__ import annotations

import copy
import os

import torch

from lora_engine.serialization import get_peft_model_state_dict


def converted_weights(
    peft_model, adapter_name: str, weights: dict[str, torch.Tensor], initial_folder: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """``weights`` (``adapter_name``'s saved tensors) as the rank-2r plain LoRA adapter described above.

    Mutates ``initial_folder``'s ``adapter_config.json`` (``init_lora_weights`` becomes True, as in peft).
    Raises ``ValueError`` for ``use_rslora`` with rank or alpha patterns (peft refuses it too) and when the
    initial adapter's config still names a weight-derived init.
    """
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    config.init_lora_weights = True
    config.save_pretrained(initial_folder)
    initial_name = os.path.basename(os.path.normpath(initial_folder))
    peft_model.load_adapter(initial_folder, adapter_name=initial_name)
    try:
        initial = get_peft_model_state_dict(peft_model, adapter_name=initial_name)
    finally:
        peft_model.delete_adapter(initial_name)
    converted = {}
    for key, value in weights.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, initial[key]], dim=0)
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -initial[key]], dim=1)
        else:
            converted[key] = value
    return converted


def converted_config(config):
    """A copy of ``config`` for the converted adapter: rank and alpha doubled (patterns too), plain init."""
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.rank_pattern = {key: 2 * value for key, value in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {key: 2 * value for key, value in (config.alpha_pattern or {}).items()}
    return config
