"""What every LoRA wrapper shares: the adapter registry of one layer, activation, and merge / unmerge.

A wrapper holds the frozen ``base_layer`` and, per adapter name, a pair of low-rank factors
``A [r, in]`` and ``B [out, r]`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rslora). Subclasses
store the factors (as peft names them, so state-dict keys match peft's) and say how the delta ``s · B A``
lines up with the base weight; merging and unmerging are the same for all of them.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from lora_engine.layers import offload_hooks
from lora_engine.layers.routing import AdapterRouting
from lora_engine.ops.lora_merge import lora_delta, lora_merge
from lora_engine.state_tensors import state_tensors


class LoraLayer(nn.Module):
    """Base of the LoRA wrappers: ``forward`` is the subclass's, the adapter bookkeeping is here."""

    #: Names of the per-adapter containers (``ModuleDict`` / ``ParameterDict``) a subclass holds.
    adapter_containers: tuple[str, ...] = ()
    #: True when the base weight is stored ``[in, out]`` relative to ``B A`` (Conv1D, Embedding).
    delta_is_transposed: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        # A float, or a 0-d tensor after utils.hotswap.prepare_model_for_compiled_hotswap.
        self.scaling: dict[str, float | torch.Tensor] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}  # lora_B carries a bias (peft's lora_bias)
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.routing: AdapterRouting | None = None  # set by LoraModel for the length of a mixed-batch forward

    def __call__(self, *args, **kwargs):
        """``nn.Module.__call__``, with the weights of accelerate-offloaded submodules loaded for the call
        (``offload_hooks``): the forward reads them without calling their modules."""
        if offload_hooks.has_offload_hooks(self.base_layer):
            with offload_hooks.weights_loaded(self):
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    # ----------------------------------------------------------------- registry
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads ``module.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        init_lora_weights,
        lora_bias: bool = False,
    ) -> None:
        """Create the factors of ``adapter_name`` on the base weight's device, frozen.

        They take the base weight's dtype when it is floating point, else stay fp32 (``_move_adapter_to_base``;
        the 4-bit wrapper uses its compute dtype). ``LoraModel.inject_adapter`` then upcasts fp16/bf16 factors
        to fp32 (peft's ``autocast_adapter_dtype``). ``lora_bias`` gives ``lora_B`` a bias (zero-initialised
        unless ``init_lora_weights`` is False), for the wrappers whose ``lora_B`` is a module (dense, conv).
        """
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout_p[adapter_name] = float(lora_dropout)
        self.lora_bias[adapter_name] = lora_bias
        self._create_factors(adapter_name, r, init_lora_weights)
        self._move_adapter_to_base(adapter_name)
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(False)  # trainable only once activated

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        raise NotImplementedError

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` of ``adapter_name``."""
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [p for name in self.adapter_containers for p in self._container_entry(name, adapter_name)]

    def adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        """The modules holding ``adapter_name``'s factors (none where they are bare parameters)."""
        found = []
        for container_name in self.adapter_containers:
            container = getattr(self, container_name)
            if adapter_name in container and isinstance(container[adapter_name], nn.Module):
                found.append(container[adapter_name])
        return found

    def wrapped_module(self) -> nn.Module:
        return self.base_layer

    def _container_entry(self, container_name: str, adapter_name: str) -> list[nn.Parameter]:
        """``adapter_name``'s parameters in one container (``[]`` when it has none there).

        Every ``set_adapter`` collects these for each layer, so the container's dicts are read directly:
        ``getattr`` / ``in`` / ``[]`` on a ``ModuleDict`` each go through Python-level ``nn.Module`` methods, and
        ``parameters()`` walks the tree through two generators. This keeps a switch's per-adapter work small
        next to its fixed walk over the model.
        """
        container = self._modules[container_name]  # a ModuleDict or a ParameterDict
        entry = container._modules.get(adapter_name)
        if entry is None:  # a ParameterDict's bare parameter, or no entry at all
            param = container._parameters.get(adapter_name)
            return [] if param is None else [param]
        if not entry._modules:  # a leaf module: the factors' nn.Linear / Conv / Embedding
            return [param for param in entry._parameters.values() if param is not None]
        return list(entry.parameters())

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        weight = self.weight  # the adapted weight (a wrapper without a base ``weight`` names its own)
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for param in self.adapter_parameters(adapter_name):
            param.data = param.data.to(device=weight.device, dtype=dtype or param.dtype)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """Saved key suffix → in-memory key suffix of ``adapter_name``'s tensors: peft drops the adapter name
        (``lora_A.<name>.weight`` → ``lora_A.weight``, ``lora_embedding_A.<name>`` → ``lora_embedding_A``)."""
        keys = {}
        for container_name in self.adapter_containers:
            container = getattr(self, container_name)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                keys[container_name] = f"{container_name}.{adapter_name}"
            else:
                for key in state_tensors(entry):
                    keys[f"{container_name}.{key}"] = f"{container_name}.{adapter_name}.{key}"
        return keys

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; they become trainable unless ``inference_mode``, all others frozen.

        Only active adapters are ever trainable, so only the previously and the newly active adapters'
        parameters are touched: switching costs the same however many adapters are loaded.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in dict.fromkeys([*self.active_adapters, *names]):
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in names and not inference_mode)
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on (the active ones become trainable again) or off (all frozen)."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self.active_adapters:
                for param in self.adapter_parameters(name):
                    param.requires_grad_(False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s factors and settings. The caller refuses merged adapters first."""
        for container_name in self.adapter_containers:
            container = getattr(self, container_name)
            if adapter_name in container:
                del container[adapter_name]
        settings = (
            self.r,
            self.lora_alpha,
            self.scaling,
            self.use_rslora,
            self.lora_dropout_p,
            self.lora_bias,
        )
        for setting in settings:
            setting.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            remaining = [name for name in self.active_adapters if name != adapter_name]
            self.active_adapters = remaining or self.adapter_names[:1]

    # ----------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``s · B A`` of ``adapter_names`` (default: the active ones) into the base weight, in place.

        Already merged adapters are skipped with a warning. With ``safe_merge`` each adapter is checked by
        ``check_merge_finite`` just before it is merged; a broken one raises ``ValueError`` and leaves the base
        weight as the adapters merged before it made it.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of str, got the str {adapter_names!r}")
        names = self.active_adapters if adapter_names is None else adapter_names
        already = [name for name in names if name in self.merged_adapters]
        if already:
            warnings.warn(f"Already merged with {already}; merging only the rest.", stacklevel=2)
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            if safe_merge:
                self.check_merge_finite([name])
            self._apply_delta(name, subtract=False)
            self.merged_adapters.append(name)

    def check_merge_finite(self, adapter_names: list[str] | None = None) -> None:
        """peft's ``safe_merge`` check, the only one: ``ValueError`` if adding any one of ``adapter_names``
        (default: the active ones; names this layer does not hold or has merged are skipped) to the base weight
        as it is now would give NaN or Inf. Mutates nothing; ``LoraModel`` runs it on every layer before merging
        any, so a broken adapter leaves the whole model untouched.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            merged = self.merged_weight(name)
            new_bias = self._merged_bias(name, subtract=False)
            if not torch.isfinite(merged).all() or (
                new_bias is not None and not torch.isfinite(new_bias).all()
            ):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name!r} seems to be broken: merging it "
                    f"would put NaN or Inf into the base weight of {type(self.base_layer).__name__}; "
                    "the base weight is untouched"
                )

    def merged_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging ``adapter_name`` would make the base weight (as ``dense_weight``); mutates nothing."""
        return self.dense_weight() + self.get_delta_weight(adapter_name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' deltas again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), subtract=True)

    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        new_bias = self._merged_bias(adapter_name, subtract)
        lora_A, lora_B = self.lora_factors(adapter_name)
        lora_merge(
            self.base_layer.weight.data,
            lora_A,
            lora_B,
            self.scaling[adapter_name],
            fan_in_fan_out=self.delta_is_transposed,
            subtract=subtract,
        )
        self._write_bias(new_bias)

    def _merged_bias(self, adapter_name: str, subtract: bool) -> torch.Tensor | None:
        """The base bias ± ``s · lora_B.bias`` of a ``lora_bias`` adapter (None for the others), computed before
        anything is written. Raises ``RuntimeError`` when the base layer has no bias."""
        if not self.lora_bias.get(adapter_name):
            return None
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            raise RuntimeError(
                f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias (adapter "
                f"{adapter_name!r} on a {type(self.base_layer).__name__})"
            )
        delta = self.lora_B[adapter_name].bias.detach() * self.scaling[adapter_name]
        merged = base_bias.data - delta if subtract else base_bias.data + delta
        return merged.to(base_bias.dtype)

    def _write_bias(self, new_bias: torch.Tensor | None) -> None:
        if new_bias is not None:
            self.base_layer.bias.data = new_bias

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor that ``get_delta_weight`` can be added to (no copy here)."""
        return self.base_layer.weight.detach()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` of ``adapter_name``, shaped and typed like the base weight."""
        lora_A, lora_B = self.lora_factors(adapter_name)
        delta = lora_delta(lora_A, lora_B, self.scaling[adapter_name], self.delta_is_transposed)
        return delta.to(self.base_layer.weight.dtype)

    def stacked_factors(
        self, routing: AdapterRouting, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The routed adapters this layer holds, stacked for ``grouped_lora``, or None if it holds none. (Mixed
        batches of linear layers on the CPU read the factors unstacked: ``LoraLinear._mixed_batch_forward``.)

        Returns ``(row_adapter [B], lora_A [n, r_max, in], lora_B [n, out, r_max], scaling [n])``; factors of
        smaller ranks are zero-padded, which leaves ``B A`` unchanged. Built afresh for each forward and
        dropped after it, never cached: a cache would keep a second copy of every routed adapter alive (and
        stale after a delete), while stacking the few adapters of a batch costs one small copy per forward.
        """
        held = [name for name in routing.names if name in self.r]
        if not held:
            return None
        factors = [self.lora_factors(name) for name in held]
        rank = max(lora_A.shape[0] for lora_A, _ in factors)
        if any(lora_A.shape[0] != rank for lora_A, _ in factors):
            pad = torch.nn.functional.pad
            factors = [
                (pad(A, (0, 0, 0, rank - A.shape[0])), pad(B, (0, rank - B.shape[1]))) for A, B in factors
            ]
        lora_A = torch.stack([factor_A for factor_A, _ in factors])
        lora_B = torch.stack([factor_B for _, factor_B in factors])
        scaling = torch.tensor(
            [float(self.scaling[name]) for name in held], dtype=torch.float32, device=device
        )
        return routing.rows_for(held, device), lora_A, lora_B, scaling

    def _unmerge_if_disabled(self) -> None:
        """With adapters disabled the forward must see the original base weight: unmerge any merged adapters
        (mutates the base weight; peft does the same at the top of its forward). Every forward calls this
        before it runs the base layer."""
        if self.disable_adapters and self.merged:
            self.unmerge()

    def _adapters_to_run(self) -> list[str]:
        """The adapters a forward adds on top of the base layer's output; reads state, changes none.

        None while adapters are disabled or merged (the base weight already holds them); else the active
        adapters this layer holds.
        """
        if self.disable_adapters or self.merged:
            return []
        return [name for name in self.active_adapters if name in self.r]
