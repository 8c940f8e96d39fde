"""``add_weighted_adapter``: a new adapter that combines existing ones, layer by layer.

peft 0.21.2's semantics and errors; the math per layer is in ``lora_engine.merging``. The new adapter's
scaling is exactly 1 (``lora_alpha = r``, ``use_rslora=False``), so ``B A`` is the whole combined delta — also
for sources trained with rslora, where peft over-scales by ``√r`` (huggingface/peft#3761).

Layer kinds, checked against what peft 0.21.2 does with each (tests/test_weighted_adapter_kinds.py):

- Linear, ``Conv1D``, embeddings, ``nn.MultiheadAttention`` (its in- and out-projection pairs, each combined
  as its own layer, as peft's nested out-projection LoRA is) and convolutions: combined as peft combines them.
- Convolutions with an SVD type: a ``Conv2d``'s delta is flattened to ``[out, in·kernel]`` and factored, as in
  peft; peft fails with a shape error on ``Conv1d``/``Conv3d`` (it reshapes only ``Conv2d``) and on grouped
  convolutions, so those are refused here by name.
- A grouped convolution with ``cat``: refused. peft concatenates the factors, but the grouped ``lora_B`` then
  reads the wrong intermediate channels (group k takes channels ``k·Σr/g …``, a mix of two sources' ranks), so
  the result is not the sum of the sources' updates (combining a source with weight 1 and another with weight
  0 does not give back the first). The factor-wise types (``linear``, ``ties``, …) keep each factor's layout
  and are combined as in peft.
- DoRA adapters: refused. peft builds the new adapter's magnitude from the base weight at injection (its
  ``lora_B`` still zero) and ignores the sources' magnitudes, so even one source with weight 1 does not give
  back that source.
- Trainable tokens (``trainable_token_indices``): refused. peft gives the new adapter the embedding's original
  rows and drops the sources' trained tokens without a word.
- ``target_parameters``: refused, as peft refuses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from lora_engine import merging
from lora_engine.config import LoraConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.conv import LoraConv
from lora_engine.layers.dora import DoraMixin
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper
from lora_engine.layers.multihead_attention import LoraMultiheadAttention
from lora_engine.layers.parameters import LoraParameters
from lora_engine.layers.trainable_tokens import TrainableTokens


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
    combination_type = merging.resolve_combination_type(combination_type, len(adapters))
    using_bias = [name for name in adapters if lora_model.peft_config[name].lora_bias]
    if using_bias:
        raise ValueError(
            f"add_weighted_adapter: adapter(s) {using_bias} use lora_bias=True; combining such adapters is not "
            "supported yet by lora_engine"
        )
    for module_name, layer in lora_model.lora_layers():
        held = [name for name in adapters if name in layer.r]
        if held:
            _check_layer_kind(module_name, layer, held, combination_type)
    for _, wrapper in lora_model.named_adapter_wrappers():
        if (
            isinstance(wrapper, ModulesToSaveWrapper)
            and sum(name in wrapper.modules_to_save for name in adapters) > 1
        ):
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save "
                f"({type(wrapper.original_module).__name__} is saved by several of {adapters})"
            )
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


def _check_layer_kind(module_name: str, layer: LoraLayer, held: list[str], combination_type: str) -> None:
    """Raise ``ValueError`` naming the adapters, the module and its layer kind where combining the adapters
    ``held`` by ``layer`` is refused (see the module docstring for why each is)."""
    kind = type(layer.base_layer).__name__
    where = f"add_weighted_adapter: adapter(s) {held} on {module_name!r} ({kind}"
    if isinstance(layer, LoraParameters):
        raise ValueError(
            f"{where} parameter(s) {layer.parameter_names}, target_parameters): combining adapters on "
            "nn.Parameter targets is not supported (peft refuses it too)"
        )
    if isinstance(layer, TrainableTokens):
        raise ValueError(
            f"{where}, trainable_token_indices): combining trainable tokens is not supported; peft would give "
            "the new adapter the embedding's original rows and silently drop the sources' trained tokens"
        )
    if isinstance(layer, DoraMixin) and any(layer.is_dora(name) for name in held):
        raise ValueError(
            f"{where}) use use_dora=True: combining DoRA adapters is not supported; peft would silently give the "
            "new adapter a magnitude computed from the base weight, ignoring the sources' magnitudes"
        )
    if not isinstance(layer, LoraConv):
        return
    grouped = layer.base_layer.groups > 1
    if combination_type in merging.SVD_COMBINATION_TYPES and (grouped or layer.conv_kind is not nn.Conv2d):
        raise ValueError(
            f"{where}{f', groups={layer.base_layer.groups}' if grouped else ''}): combination_type "
            f"{combination_type!r} factors the full delta, which is supported on ungrouped Conv2d only (peft "
            "fails on this layer too); use a factor-wise type such as 'linear', 'cat' or 'ties'"
        )
    if combination_type == "cat" and grouped:
        raise ValueError(
            f"{where}, groups={layer.base_layer.groups}): combination_type 'cat' is not supported on a grouped "
            "convolution: the grouped lora_B would mix the sources' ranks (peft silently returns a wrong "
            "adapter); use 'linear', 'ties' or another factor-wise type"
        )


def _factor_pairs(layer: LoraLayer, adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(A, B)`` pairs of ``adapter_name`` on ``layer``, each combined on its own: the out-projection of
    ``nn.MultiheadAttention`` is a second pair (peft nests a LoRA Linear there)."""
    pairs = [layer.lora_factors(adapter_name)]
    if isinstance(layer, LoraMultiheadAttention):
        pairs.append(layer.out_proj_factors(adapter_name))
    return pairs


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
    source_pairs = [_factor_pairs(layer, name) for name in sources]
    for index, (target_A, target_B) in enumerate(_factor_pairs(layer, adapter_name)):
        pairs = [pairs_of_source[index] for pairs_of_source in source_pairs]
        if combination_type in merging.SVD_COMBINATION_TYPES:
            deltas = []
            for name, (lora_A, lora_B) in zip(sources, pairs):
                # In the adapter's dtype and the base weight's layout, as peft does; a convolution's delta as
                # the matrix [out, in·kernel] (its B is [out, r, 1, …], its A [r, in, *kernel]).
                delta = lora_B.reshape(lora_B.shape[0], -1) @ lora_A.reshape(lora_A.shape[0], -1)
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
            new_A, new_B = merging.combine_factors(
                [lora_A for lora_A, _ in pairs],
                [lora_B for _, lora_B in pairs],
                [layer.scaling[name] for name in sources],
                source_weights,
                combination_type,
                density=combine_options.get("density"),
                majority_sign_method=combine_options.get("majority_sign_method", "total"),
            )
        # The SVD types return matrices; a convolution's factors get their kernel dimensions back.
        new_A = new_A.reshape(new_A.shape[0], *target_A.shape[1:])
        new_B = new_B.reshape(*new_B.shape[:2], *target_B.shape[2:])
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
