"""``LoraModel``: puts LoRA wrappers into a model and runs the adapter registry across all of them.

The transformers model is mutated in place: each targeted module is replaced by a wrapper from ``layers/``
that holds the original as ``base_layer``; ``modules_to_save`` become ``ModulesToSaveWrapper``. Every
model-wide operation (activate, disable, delete, merge, unload) is a loop over those wrappers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lora_engine.config import LoraConfig
from lora_engine.extra_targets import add_parameter_loras, add_trainable_tokens, wrapped_bases
from lora_engine.initialization.loftq_config import LoftQConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.dense import LoraLinear
from lora_engine.layers.dispatch import as_dora, check_lora_bias, naming_module, wrap_module
from lora_engine.layers.dora import DORA_CLASSES
from lora_engine.layers.inits import is_weight_derived
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper
from lora_engine.layers.routing import BASE_ONLY, AdapterRouting
from lora_engine.module_tree import named_modules_outside_adapters, replace_submodule
from lora_engine.serialization import check_adapter_name
from lora_engine.targeting import find_targets, is_module_to_save, rank_and_alpha
from lora_engine.weighted import add_weighted_adapter

AdapterWrapper = LoraLayer | ModulesToSaveWrapper


class LoraModel(nn.Module):
    """Holds the mutated transformers ``model`` and the ``peft_config`` of every adapter in it.

    ``model.peft_config`` is the same dict object as ``self.peft_config``.
    """

    prefix = "lora_"

    def __init__(
        self, model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(adapter_name, config, autocast_adapter_dtype)
        self.model.peft_config = self.peft_config

    # ------------------------------------------------------------------ wrappers
    def named_adapter_wrappers(self) -> Iterator[tuple[str, AdapterWrapper]]:
        """``(module name in self.model, wrapper)`` for every LoRA layer and modules_to_save wrapper.

        The walk does not descend into wrappers (they never nest), so its cost does not grow with the number
        of adapters loaded: switching adapters stays flat.
        """
        pending = [("", self.model)]
        while pending:
            name, module = pending.pop()
            if isinstance(module, LoraLayer | ModulesToSaveWrapper):
                yield name, module
                continue
            children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
            pending.extend(reversed(children))

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.named_adapter_wrappers():
            if isinstance(module, LoraLayer):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self, adapter_name: str, config: LoraConfig, autocast_adapter_dtype: bool = True
    ) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` targets; new adapters start inactive.

        On any error the model is left as it was before the call.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first")
        self.peft_config[adapter_name] = config
        created: list[tuple[str, nn.Module]] = []
        try:
            self._add_modules_to_save(adapter_name, config, created)
            wrapped = [name for name, _ in self.named_adapter_wrappers()]
            if config.target_modules or not config.target_parameters:  # peft: only parameters when no modules
                for module_name in find_targets(self.model, config, skip_within=wrapped):
                    self._add_lora(module_name, adapter_name, config, created)
            if config.target_parameters is not None:
                add_parameter_loras(self.model, adapter_name, config, wrapped_bases(self), created)
            if config.trainable_token_indices is not None:
                add_trainable_tokens(self.model, adapter_name, config, created)
        except Exception:
            self._roll_back(adapter_name, created)
            raise
        if autocast_adapter_dtype:
            self._upcast_adapter(adapter_name)
        self._mark_only_adapters_trainable()

    def _add_lora(self, module_name: str, adapter_name: str, config: LoraConfig, created: list) -> None:
        module = self.model.get_submodule(module_name)
        if isinstance(module, ModulesToSaveWrapper):
            return
        if not isinstance(module, LoraLayer):
            module = wrap_module(module_name, module)
            replace_submodule(self.model, module_name, module)
            created.append((module_name, module))
        self._check_fan_in_fan_out(module_name, module, config)
        r, lora_alpha = rank_and_alpha(module_name, config)
        init = config.init_lora_weights
        if (is_weight_derived(init) or init == "loftq") and type(module) not in (
            LoraLinear,
            DORA_CLASSES[LoraLinear],
        ):
            raise ValueError(
                f"init_lora_weights={init!r} on {module_name!r} "
                f"({type(module.base_layer).__name__}) is not supported yet by lora_engine; it supports it on "
                + ("torch.nn.Linear" if init == "loftq" else "torch.nn.Linear and transformers Conv1D")
            )
        if init == "loftq":  # the dense layer's init needs the settings, not the name
            init = LoftQConfig(**config.loftq_config)
        settings = (r, lora_alpha, config.lora_dropout, config.use_rslora, init)
        if config.use_dora:
            as_dora(module_name, module).add_dora_adapter(adapter_name, *settings)
        elif config.lora_bias:
            check_lora_bias(module_name, module)
            module.add_adapter(adapter_name, *settings, lora_bias=True)
        else:
            module.add_adapter(adapter_name, *settings)

    @staticmethod
    def _check_fan_in_fan_out(module_name: str, module: LoraLayer, config: LoraConfig) -> None:
        # peft corrects a wrong fan_in_fan_out for the module kind, with a warning, and so do we.
        if isinstance(module, LoraLinear) and module.fan_in_fan_out != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {module_name!r} "
                f"({type(module.base_layer).__name__}); setting fan_in_fan_out={module.fan_in_fan_out}",
                stacklevel=4,
            )
            config.fan_in_fan_out = module.fan_in_fan_out

    def _add_modules_to_save(self, adapter_name: str, config: LoraConfig, created: list) -> None:
        if not config.modules_to_save:
            return
        for module_name, module in list(named_modules_outside_adapters(self.model)):
            if not module_name or not is_module_to_save(module_name, config.modules_to_save):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            elif not any(module_name.startswith(f"{name}.") for name, _ in created):
                wrapper = ModulesToSaveWrapper(module, adapter_name)
                replace_submodule(self.model, module_name, wrapper)
                created.append((module_name, wrapper))

    def _roll_back(self, adapter_name: str, created: list[tuple[str, nn.Module]]) -> None:
        for module_name, wrapper in reversed(created):
            original = wrapper.base_layer if isinstance(wrapper, LoraLayer) else wrapper.original_module
            replace_submodule(self.model, module_name, original)
        for _, wrapper in self.named_adapter_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]

    def _upcast_adapter(self, adapter_name: str) -> None:
        """peft's ``autocast_adapter_dtype``: fp16/bf16 LoRA factors are kept in fp32."""
        for _, layer in self.lora_layers():
            for param in layer.adapter_parameters(adapter_name):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()

    def _mark_only_adapters_trainable(self) -> None:
        """After an injection, as peft does: every base parameter is frozen except the biases the active
        adapters' ``bias`` setting trains; then the active adapters are made trainable (unless their config
        says ``inference_mode``) and all others frozen."""
        # Adapters other than the active ones are frozen already (``set_adapter`` keeps it so), so only the
        # parameters outside the adapters are walked: the cost stays flat in the number of adapters loaded.
        for _, module in named_modules_outside_adapters(self.model):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
        active = self.active_adapters
        for name in active:
            bias = self.peft_config[name].bias
            if bias == "all":
                for param_name, param in self.model.named_parameters():
                    if param_name == "bias" or param_name.endswith(".bias"):
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for _, layer in self.lora_layers():
                    if name in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)
        inference_mode = any(self.peft_config[name].inference_mode for name in active)
        self._activate(active, inference_mode)

    def _activate(self, adapter_names: list[str], inference_mode: bool) -> None:
        """``adapter_names`` become the active adapters of every wrapper, trainable unless ``inference_mode``."""
        for _, wrapper in self.named_adapter_wrappers():
            wrapper.set_adapter(adapter_names, inference_mode=inference_mode)

    # ------------------------------------------------------------------ registry
    def _check_known(self, adapter_names: list[str]) -> None:
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Adapter(s) {unknown} not found; available adapters: {sorted(self.peft_config)}"
            )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their outputs add up); active adapters become trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        for _, layer in self.lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
        self.active_adapter = adapter_name
        self._activate(names, inference_mode)

    def enable_adapter_layers(self) -> None:
        for _, wrapper in self.named_adapter_wrappers():
            wrapper.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            if self.peft_config[name].bias != "none":
                warnings.warn(
                    f"Adapter {name!r} trains biases (bias={self.peft_config[name].bias!r}): with adapters "
                    "disabled the output still differs from the base model's"
                )
        for _, wrapper in self.named_adapter_wrappers():
            wrapper.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere. Refused while it is merged; a new active adapter is chosen."""
        self._check_known([adapter_name])
        merged_in = [name for name, layer in self.lora_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into {merged_in[0]!r} (and {len(merged_in) - 1} more "
                "modules); unmerge it before deleting it"
            )
        for _, wrapper in self.named_adapter_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        for module_name, wrapper in list(self.named_adapter_wrappers()):
            if not wrapper.adapter_names:
                original = wrapper.base_layer if isinstance(wrapper, LoraLayer) else wrapper.original_module
                replace_submodule(self.model, module_name, original)
        remaining_active = [name for name in self.active_adapters if name != adapter_name]
        if remaining_active == self.active_adapters:
            return
        new_active = remaining_active or sorted(self.peft_config)[:1]
        if new_active:
            warnings.warn(
                f"Deleted the active adapter {adapter_name!r}; the active adapter is now {new_active}"
            )
        self.active_adapter = new_active[0] if len(new_active) == 1 else new_active
        self._activate(new_active, inference_mode=False)

    # ------------------------------------------------------------------ combining adapters
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, the weighted combination of ``adapters``; see ``lora_engine.weighted``."""
        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )

    # ------------------------------------------------------------------ mixed batches
    @contextmanager
    def route_rows(self, adapter_names: list[str]):
        """Context manager: while inside it, batch row ``b`` runs adapter ``adapter_names[b]`` in every layer
        (``"__base__"``: the base model only). The routing is built once here, for all layers.

        Raises ``ValueError`` for unknown names, in training mode, or while any adapter is merged (peft's rules).
        """
        if isinstance(adapter_names, str) or not isinstance(adapter_names, list | tuple):
            raise TypeError(
                f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}"
            )
        unknown = sorted({name for name in adapter_names if name != BASE_ONLY} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {unknown}; available adapters: "
                f"{sorted(self.peft_config)} (and {BASE_ONLY!r} for the base model)"
            )
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode; call model.eval()"
            )
        merged = [name for name, layer in self.lora_layers() if layer.merged]
        if merged:
            raise ValueError(
                f"Cannot pass `adapter_names` when there are merged adapters (e.g. in {merged[0]!r}); "
                "call unmerge_adapter() first"
            )
        routing = AdapterRouting(list(adapter_names))
        wrappers = [wrapper for _, wrapper in self.named_adapter_wrappers()]
        for wrapper in wrappers:
            wrapper.routing = routing
        try:
            yield routing
        finally:
            for wrapper in wrappers:
                wrapper.routing = None

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``adapter_names`` (default: the active ones) into the base weights; they can be unmerged.

        With ``safe_merge`` every layer is checked before any is merged, so a broken adapter raises
        ``ValueError`` and leaves every base weight untouched (peft leaves earlier layers merged).
        """
        if adapter_names is not None:
            self._check_known(list(adapter_names))
        if safe_merge:
            self.check_merges_finite(adapter_names)
        for module_name, layer in self.lora_layers():
            with naming_module(module_name):
                layer.merge(adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge, then put every base layer back in place of its wrapper; returns the transformers model.

        With ``safe_merge`` a broken adapter raises before any layer is replaced or any weight is changed.
        """
        if safe_merge:
            self.check_merges_finite(adapter_names)
        return self._unload(merge=True, progressbar=progressbar, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Put every base layer back, without merging; returns the transformers model."""
        return self._unload(merge=False)

    def merge_and_unload_dequantized(
        self,
        dtype: torch.dtype | None = None,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Export a bitsandbytes-quantized model as a dense one; see ``layers.bnb_export``."""
        from lora_engine.layers.bnb_export import merge_and_unload_dequantized  # imports bitsandbytes

        return merge_and_unload_dequantized(self, dtype, safe_merge, adapter_names)

    def check_merges_finite(self, adapter_names: list[str] | None) -> None:
        """``safe_merge`` for the whole model: every layer's ``check_merge_finite`` runs before any layer is
        merged. ``ValueError`` naming the module and the adapter; nothing is mutated."""
        for module_name, layer in self.lora_layers():
            with naming_module(module_name):
                layer.check_merge_finite(adapter_names)

    def _unload(
        self, merge: bool, progressbar: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        wrappers = list(self.named_adapter_wrappers())
        if progressbar:
            from tqdm.auto import tqdm

            wrappers = tqdm(wrappers, desc="Unloading and merging model" if merge else "Unloading model")
        for module_name, wrapper in wrappers:
            if isinstance(wrapper, ModulesToSaveWrapper):
                replace_submodule(self.model, module_name, wrapper.active_module())
                continue
            if merge:
                with naming_module(module_name):
                    wrapper.merge(adapter_names=adapter_names)
            replace_submodule(self.model, module_name, wrapper.base_layer)
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        return self.model

    # ------------------------------------------------------------------ forwarding
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
