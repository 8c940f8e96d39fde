"""EVA (Explained Variance Adaptation), peft 0.21's ``init_lora_weights="eva"``: each adapted dense layer's
``lora_A`` starts as the top right-singular vectors of that layer's inputs on a dataset, and the total rank
``Σ r`` is redistributed across layers by explained variance (a layer gets between 0 and ``round(r·rho)``).

Flow, as in peft: ``get_peft_model(model, LoraConfig(init_lora_weights="eva", ...))`` creates the adapters with
``lora_B = 0`` (so the model is unchanged); ``initialize_lora_eva_weights(peft_model, dataloader)`` then runs the
base model (adapters disabled) batch after batch, with one incremental SVD per distinct layer input, until the
components each layer needs have converged; ``lora_A`` is set, ranks that changed are re-created (a layer given
rank 0 loses its adapter), and the adapter's config records the outcome (``rank_pattern``, ``alpha_pattern``,
``target_modules``), so the saved adapter loads in peft and in lora_engine. Only ``nn.Linear``/``Conv1D`` layers
(also DoRA and 4-bit ones) are initialised; other adapted layers get the default init, with peft's warning.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from itertools import cycle

import torch
import torch.distributed as dist
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.initialization.eva_hooks import (
    InputFingerprint,
    InputSvd,
    forward_fn_dict,
    per_layer_functions,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
)
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.dense import LoraLinear
from lora_engine.layers.trainable_tokens import TrainableTokens
from lora_engine.module_tree import replace_submodule
from lora_engine.targeting import _shortened, is_targeted, rank_and_alpha

#: A larger ``rho`` is capped at (largest parameter dimension) / r, as in peft.
RHO_THRESHOLD = 1000
PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config=None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """``{layer name: lora_A [rank, in_features] (float32)}`` for every layer EVA initialises; a layer's rank is
    what the redistribution gives it, possibly 0.

    ``model``: a ``PeftModel`` (its dense LoRA layers, names as in ``model.named_modules()``, run with adapters
    disabled; ``peft_config`` defaults to ``adapter_name``'s), or any model with ``peft_config`` given (its
    ``nn.Linear``/``Conv1D`` modules that ``target_modules`` names). ``dataloader``: a sized iterable of batches,
    cycled until every layer converged (``len() == 0`` is a ``ValueError``). ``forward_fn(model, batch)`` runs a
    batch; ``prepare_model_inputs_fn(batch, peft_config)`` and ``prepare_layer_inputs_fn(layer_input,
    model_input, layer_name)`` (one function, a ``{layer name: function}`` mapping, or None for all rows) choose
    the rows of each layer input that enter the SVD; the defaults keep the tokens the attention mask and label
    mask keep. The model's training mode is restored; parameters are not changed.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if is_peft_model:
        context = model.disable_adapter()

        def is_eva_layer(name, module):
            return isinstance(module, LoraLinear)
    else:
        context = nullcontext()

        def is_eva_layer(name, module):
            targeted = peft_config.target_modules is None or is_targeted(name, peft_config)
            return isinstance(module, (nn.Linear, Conv1D)) and targeted

    with context:
        return _components_by_layer(
            model,
            dataloader,
            peft_config,
            is_eva_layer,
            forward_fn,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            gather_distributed_inputs,
            show_progress_bar,
        )


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Set ``adapter_name``'s LoRA layers of the ``PeftModel`` ``model`` (mutated, and returned) from
    ``eva_state_dict``, or from ``get_eva_state_dict`` run on ``dataloader`` with the other arguments.

    A layer whose rank changed gets a new adapter of that rank (``lora_B = 0``; ``lora_alpha`` scaled by
    ``new/old`` rank when ``eva_config.adjust_scaling_factors``); rank 0 removes the layer's LoRA wrapper. Layers
    the state dict does not cover get the default init (a warning names them). The config's ``target_modules``,
    ``rank_pattern`` and ``alpha_pattern`` are rewritten to describe the result, as peft does.
    ``ValueError`` when ``model`` is not a PeftModel, has several active adapters, the adapter's
    ``init_lora_weights`` is not ``"eva"``, or neither a dataloader nor a state dict is given.
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError(
            "`initialize_lora_eva_weights` currently only works with a single active adapter, "
            f"got {model.active_adapters}"
        )
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    _load_eva_state_dict(model, dict(eva_state_dict), adapter_name)
    return model


def _components_by_layer(
    model,
    dataloader,
    peft_config,
    is_eva_layer,
    forward_fn,
    prepare_model_inputs_fn,
    prepare_layer_inputs_fn,
    gather_distributed_inputs,
    show_progress_bar,
) -> dict[str, torch.Tensor]:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, "
            "therefore EVA initialization will gather tensors from all ranks. "
            "Ensure the model does not receive the same inputs on different ranks.",
            stacklevel=3,
        )
    layers = {name: module for name, module in model.named_modules() if is_eva_layer(name, module)}
    functions = per_layer_functions(prepare_layer_inputs_fn, list(layers))
    training = model.training
    model.eval()
    run = _EvaPass(model, peft_config, layers, forward_fn, prepare_model_inputs_fn)
    try:
        run.share_svds_between_equal_inputs(next(iter(dataloader)), functions, gather_distributed_inputs)
        run.add_svd_hooks(functions, gather_distributed_inputs)
        rank_dist = run.until_converged(dataloader, show_progress_bar)
    finally:
        run.remove_hooks()
    components = run.components(rank_dist)
    model.train(training)
    return components


class _EvaPass:
    """One data pass of EVA over ``model``'s ``layers`` ({name: module}); hooks it adds are tracked in
    ``handles`` so that ``remove_hooks`` leaves the model as it was, whatever raised."""

    def __init__(self, model, peft_config, layers, forward_fn, prepare_model_inputs_fn) -> None:
        self.model, self.peft_config, self.layers = model, peft_config, layers
        self.forward_fn, self.prepare_model_inputs_fn = forward_fn, prepare_model_inputs_fn
        self.device = _device_of(model)
        rho = peft_config.eva_config.rho
        if rho > RHO_THRESHOLD:
            rho = min(rho, max(max(param.shape) for param in model.parameters()) // peft_config.r)
        ranks = {name: rank_and_alpha(name, peft_config)[0] for name in layers}
        self.max_components = {name: round(rank * rho) for name, rank in ranks.items()}
        self.rank_budget = sum(ranks.values())
        self.handles: dict[str, torch.utils.hooks.RemovableHandle | None] = {}
        self.svds: dict[str, InputSvd] = {}  # one per distinct input, held by its first layer
        self.svd_of: dict[str, str] = {}  # layer name -> name of the layer holding its SVD

    def batch_and_model_input(self, batch):
        """``batch`` on the model's device, and what the hooks get as ``model_input`` for it."""
        batch = _to_device(batch, self.device)
        if self.prepare_model_inputs_fn is not None:
            return batch, self.prepare_model_inputs_fn(batch, self.peft_config)
        return batch, copy.deepcopy(batch)

    def share_svds_between_equal_inputs(self, first_batch, functions, gather_distributed_inputs) -> None:
        """Run ``first_batch`` with fingerprint hooks; layers fed the same input share one SVD, held by the first
        of them, whose ``max_components`` all take the largest of theirs."""
        batch, model_input = self.batch_and_model_input(first_batch)
        fingerprints = {}
        for name, module in self.layers.items():
            fingerprints[name] = InputFingerprint(name, functions[name], gather_distributed_inputs)
            fingerprints[name].model_input = model_input
            self.handles[name] = module.register_forward_hook(fingerprints[name])
        self.forward_fn(self.model, batch)
        self.remove_hooks()
        idle = [name for name, hook in fingerprints.items() if hook.fingerprint is None]
        if idle:
            raise ValueError(
                f"layers {idle} got no input from the first batch, so EVA cannot fit them (it would wait for them "
                "forever); leave them out of target_modules, or pass a forward_fn that runs them"
            )
        groups: dict[str, list[str]] = {}
        for name, hook in fingerprints.items():
            groups.setdefault(hook.fingerprint, []).append(name)
        self.svd_of = {names[0]: names[0] for names in groups.values()}
        self.svd_of.update({name: names[0] for names in groups.values() for name in names[1:]})
        for names in groups.values():
            largest = max(self.max_components[name] for name in names)
            self.max_components.update(dict.fromkeys(names, largest))

    def add_svd_hooks(self, functions, gather_distributed_inputs) -> None:
        for name, owner in self.svd_of.items():
            if name != owner:
                continue
            self.svds[name] = InputSvd(
                n_components=self.max_components[name],
                tau=self.peft_config.eva_config.tau,
                name=name,
                prepare_layer_inputs_fn=functions[name],
                gather_distributed_inputs=gather_distributed_inputs,
            )
            self.handles[name] = self.layers[name].register_forward_hook(self.svds[name])

    def until_converged(self, dataloader, show_progress_bar: bool) -> dict[str, int]:
        """Feed batches (cycling the dataloader) until each SVD's components up to its layers' current ranks have
        converged; a converged SVD's hook is removed (and put back if it stops being converged). Returns the
        final rank of every layer."""
        progress = None
        if show_progress_bar and (not dist.is_initialized() or dist.get_rank() == 0):
            from tqdm import tqdm

            progress = tqdm(position=0, leave=False)
        converged = dict.fromkeys(self.svds, False)
        rank_dist = self.max_components.copy()
        for batch in cycle(dataloader):
            batch, model_input = self.batch_and_model_input(batch)
            for name, svd_hook in self.svds.items():
                now_converged = bool(torch.all(svd_hook.converged[: rank_dist[name]]))
                if not converged[name] and now_converged and self.handles[name] is not None:
                    self.handles[name].remove()
                    self.handles[name] = None
                    converged[name] = True
                    continue
                if converged[name] and not now_converged:
                    self.handles[name] = self.layers[name].register_forward_hook(svd_hook)
                    converged[name] = False
                svd_hook.model_input = model_input
            if progress is not None:
                done = sum(converged[owner] for owner in self.svd_of.values())
                progress.set_description(f"{done}/{len(self.svd_of)} layers have converged")
                progress.update()
            if all(converged.values()):
                break
            self.forward_fn(self.model, batch)
            if all(svd_hook.svd.fitted for svd_hook in self.svds.values()):
                rank_dist = _rank_distribution(self.svds, self.svd_of, self.rank_budget, self.max_components)
        if progress is not None:
            progress.close()
        return rank_dist

    def components(self, rank_dist: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each layer's first ``rank`` components (divided by √S when ``whiten``), on the model's device."""
        found = {}
        for name, rank in rank_dist.items():
            svd_hook = self.svds[self.svd_of[name]]
            if not torch.all(svd_hook.converged[:rank]):
                raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
            layer_components = svd_hook.svd.components_[:rank]
            if self.peft_config.eva_config.whiten:
                layer_components = layer_components / svd_hook.svd.singular_values_[:rank].sqrt().reshape(
                    -1, 1
                )
            found[name] = layer_components if self.device is None else layer_components.to(self.device)
        return found

    def remove_hooks(self) -> None:
        for handle in self.handles.values():
            if handle is not None:
                handle.remove()
        self.handles = {}


def _rank_distribution(svds, svd_of, rank_budget: int, max_components) -> dict[str, int]:
    """Each layer's rank: the ``rank_budget`` largest explained-variance ratios over all layers' first
    ``max_components`` components, counted per layer; a layer sharing its input with the SVD's holder never
    gets more than the holder (their counts are swapped if it would)."""
    ratios = {name: svd_hook.svd.explained_variance_ratio_ for name, svd_hook in svds.items()}
    keys, values = zip(
        *[(name, ratio) for name, owner in svd_of.items() for ratio in ratios[owner][: max_components[name]]]
    )
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:rank_budget])
    counts = {name: counts.get(name, 0) for name in svd_of}
    for name, owner in svd_of.items():
        if name == owner:
            continue
        if counts[owner] < counts[name]:
            counts[owner], counts[name] = counts[name], counts[owner]
    return counts


def _load_eva_state_dict(model, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    kept, missing, other_names = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        name_in_base_model = name.replace(PEFT_PREFIX, "")
        if not isinstance(module, LoraLayer) or isinstance(module, TrainableTokens):
            other_names.append(name_in_base_model)
            continue
        r, alpha = rank_and_alpha(name_in_base_model, config)
        if name in eva_state_dict:
            components = eva_state_dict.pop(name)
            new_rank = components.size(0)
            if new_rank == 0:
                replace_submodule(model, name, module.base_layer)
                continue
            if new_rank != r and config.eva_config.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != r:
                _recreate_adapter(module, adapter_name, config, new_rank, alpha, "eva")
            module.lora_A[adapter_name].weight.copy_(components)
            kept.append(name_in_base_model)
        else:
            _recreate_adapter(module, adapter_name, config, r, alpha, True)
            missing.append(name_in_base_model)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[name_in_base_model] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name_in_base_model] = alpha
    targets = kept + missing
    if len(targets) >= 20:  # peft stores the shortest suffixes that still single out these layers
        targets = set(_shortened(targets, [*targets, *other_names]))
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(
            "the following layers were initialized with init_lora_weights=True because they "
            f"were not found in the eva state_dict: {missing}\ncurrently the "
            "following lora modules are not supported by EVA: embeddings, multihead attention and convolutions",
            stacklevel=3,
        )


def _recreate_adapter(module: LoraLayer, adapter_name: str, config, r: int, alpha: float, init) -> None:
    """Replace ``adapter_name`` on ``module`` by a fresh one of rank ``r`` and ``lora_alpha`` ``alpha`` with
    init ``init``, keeping the old factors' dtype, whether it is active, and whether it was trainable."""
    old = module.adapter_parameters(adapter_name)
    dtype, trainable = old[0].dtype, old[0].requires_grad
    active = list(module.active_adapters)
    module.delete_adapter(adapter_name)
    settings = (r, alpha, config.lora_dropout, config.use_rslora, init)
    if config.use_dora:
        module.add_dora_adapter(adapter_name, *settings)
    else:
        module.add_adapter(adapter_name, *settings)
    for param in module.adapter_parameters(adapter_name):
        param.data = param.data.to(dtype)
        param.requires_grad_(trainable)
    module.active_adapters = active


def _device_of(model: nn.Module) -> torch.device | None:
    devices = list({param.device for param in model.parameters() if param.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", stacklevel=4)
        return None
    return devices[0]


def _to_device(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({key: _to_device(value, device) for key, value in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(value, device) for value in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=4)
    return inputs
