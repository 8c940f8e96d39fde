"""``add_weighted_adapter``: a new adapter that combines existing ones, layer by layer.

peft 0.21.2's semantics and errors; the math per layer is in ``lora_engine.merging``. The new adapter's
scaling is exactly 1 (``lora_alpha = r``, ``use_rslora=False``), so ``B A`` is the whole combined delta — also
for sources trained with rslora, where peft over-scales by ``√r`` (huggingface/peft#3761).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import torch

from lora_engine import merging
from lora_engine.config import LoraConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.conv import LoraConv
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper


class AdapterRegistry(Protocol):
    """What ``add_weighted_adapter`` uses of a ``LoraModel`` (stated here so that ``tuner`` can import this
    module without this module importing ``tuner``)."""

    peft_config: dict[str, LoraConfig]

    def named_adapter_wrappers(self) -> Iterator[tuple[str, LoraLayer | ModulesToSaveWrapper]]: ...

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]: ...

    def inject_adapter(self, adapter_name: str, config: LoraConfig) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...


def add_weighted_adapter(
    lora_model: AdapterRegistry,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    **combine_options,
) -> None:
    """Add ``adapter_name`` to ``lora_model``: the ``combination_type`` combination of ``adapters`` with
    ``weights``. ``combine_options`` are ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``, ``density`` and
    ``majority_sign_method``, as in peft.

    The new adapter is added inactive and frozen; an existing ``adapter_name`` is left as it is (as in
    peft). A refused combination (e.g. a pruning type without ``density``) raises ``ValueError`` and leaves no
    adapter behind.
    """
    if adapter_name in lora_model.peft_config:
        return
    unknown = [name for name in adapters if name not in lora_model.peft_config]
    if unknown:
        raise ValueError(
            f"Adapter(s) {unknown} not found; available adapters: {sorted(lora_model.peft_config)}"
        )
    for option in ("use_dora", "lora_bias"):
        using = [name for name in adapters if getattr(lora_model.peft_config[name], option)]
        if using:
            raise ValueError(
                f"add_weighted_adapter: adapter(s) {using} use {option}=True; combining such adapters is not "
                "supported yet by lora_engine"
            )
    conv = [
        name
        for name, layer in lora_model.lora_layers()
        if isinstance(layer, LoraConv) and set(adapters) & set(layer.r)
    ]
    if conv:
        raise ValueError(
            f"add_weighted_adapter: the adapters are on convolutions ({conv[0]!r}); combining adapters of "
            "Conv1d/Conv2d/Conv3d layers is not supported yet by lora_engine"
        )
    for _, wrapper in lora_model.named_adapter_wrappers():
        if (
            isinstance(wrapper, ModulesToSaveWrapper)
            and sum(name in wrapper.modules_to_save for name in adapters) > 1
        ):
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save "
                f"({type(wrapper.original_module).__name__} is saved by several of {adapters})"
            )
    combination_type = merging.resolve_combination_type(combination_type, len(adapters))
    configs = [lora_model.peft_config[name] for name in adapters]
    ranks = [max([config.r, *config.rank_pattern.values()]) for config in configs]
    rank = merging.new_rank(ranks, combination_type, svd_rank)
    config = dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=_union_of_targets(adapters, configs),
        rank_pattern={},
        alpha_pattern={},
    )
    lora_model.inject_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in lora_model.lora_layers():
                if adapter_name in layer.r:
                    _fill_layer(
                        layer, adapter_name, adapters, weights, combination_type, rank, combine_options
                    )
    except Exception:
        lora_model.delete_adapter(adapter_name)
        raise


def _fill_layer(
    layer: LoraLayer,
    adapter_name: str,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    rank: int,
    combine_options: dict,
) -> None:
    """Write the combination of the sources this layer holds into ``adapter_name``'s factors (zero-padded)."""
    sources = [name for name in adapters if name in layer.r]
    source_weights = [weight for name, weight in zip(adapters, weights) if name in layer.r]
    if combination_type in merging.SVD_COMBINATION_TYPES:
        deltas = []
        for name in sources:
            lora_A, lora_B = layer.lora_factors(name)
            delta = lora_B @ lora_A  # in the adapter's dtype and the base weight's layout, as peft does
            deltas.append((delta.T if layer.delta_is_transposed else delta) * layer.scaling[name])
        new_A, new_B = merging.combine_deltas_svd(
            deltas,
            source_weights,
            combination_type,
            rank,
            fan_in_fan_out=layer.delta_is_transposed,
            **combine_options,
        )
    else:
        factors = [layer.lora_factors(name) for name in sources]
        new_A, new_B = merging.combine_factors(
            [lora_A for lora_A, _ in factors],
            [lora_B for _, lora_B in factors],
            [layer.scaling[name] for name in sources],
            source_weights,
            combination_type,
            density=combine_options.get("density"),
            majority_sign_method=combine_options.get("majority_sign_method", "total"),
        )
    target_A, target_B = layer.lora_factors(adapter_name)
    target_A.zero_()
    target_B.zero_()
    target_A[: new_A.shape[0]] = new_A
    target_B[:, : new_B.shape[1]] = new_B


def _union_of_targets(adapters: list[str], configs: list[LoraConfig]) -> str | set[str]:
    """The new adapter's ``target_modules``: the union of the sources' sets, or their regexes or-ed together."""
    if len({type(config.target_modules) for config in configs}) > 1:
        raise ValueError(
            f"all adapter configs should follow the same target modules type; {adapters} mix a str (regex) "
            "target_modules with a list/set, which add_weighted_adapter does not support"
        )
    if isinstance(configs[0].target_modules, str):
        return "|".join(f"({config.target_modules})" for config in configs)
    return set().union(*(config.target_modules for config in configs))
