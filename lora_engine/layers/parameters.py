"""LoRA on ``nn.Parameter``s of a module (peft's ``target_parameters`` / ``ParamWrapper``), such as the stacked
expert weights of a mixture-of-experts block (transformers' ``MixtralExperts.gate_up_proj [E, 2I, H]``).

The wrapper replaces the module that holds the parameters and runs it through ``torch.func.functional_call``
with ``W + Σ s·ΔW`` in place of each targeted parameter, so whatever the module does with the parameter (a
Python loop over experts, ``grouped_mm``) sees the adapted weight, gradients reach the factors, and ``W`` is
only written by ``merge``. No dropout: it cannot be factored out of a weight delta (peft refuses it too).

Factor layout (peft's, so files interchange): a parameter ``[E, a, b]`` is ``E`` experts of ``[out, in] = [a, b]``
(transformers' default), or ``[in, out] = [a, b]`` when the module says ``is_transposed``; a 2-D parameter is one
``[out, in]`` matrix (``E = 1``). ``lora_A`` is an ``nn.Linear(in, r·E)`` (weight ``[r·E, in]``, expert ``e``'s
rows ``e·r … e·r + r``) and ``lora_B`` an ``nn.Linear(r·E, out)`` (weight ``[out, r·E]``, expert ``e``'s columns
``e, E + e, 2E + e, …``: peft reshapes it ``[out, r, E]``). ``ΔW_e = B_e A_e`` laid out like the parameter.

peft nests one wrapper per parameter (the first parameter the module registers innermost); here one wrapper holds
every targeted parameter of the module and saves each one's factors under peft's nested keys
(``base_layer.`` repeated once per wrapper outside it). In memory they are ``lora_A.<parameter>.<adapter>``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.inits import init_default_factors


class ParameterShape:
    """How one targeted parameter lines up with its factors: experts, in/out sizes and orientation."""

    def __init__(self, module_name: str, parameter_name: str, parameter: torch.Tensor, is_transposed: bool):
        if parameter.dim() == 3:
            self.num_experts, first, second = parameter.shape
            self.transposed = is_transposed  # [E, in, out] instead of [E, out, in]
            self.in_features, self.out_features = (first, second) if is_transposed else (second, first)
        elif parameter.dim() == 2:
            self.num_experts, self.transposed = 1, False
            self.out_features, self.in_features = parameter.shape
        else:
            raise ValueError(
                f"target_parameters: {module_name}.{parameter_name} has shape {tuple(parameter.shape)}; LoRA on a "
                "parameter needs a 2-D [out, in] or a 3-D [experts, out, in] (or is_transposed [experts, in, out]) "
                "tensor"
            )


def saved_prefix(parameter_names: list[str], parameter_name: str) -> str:
    """Where peft saves ``parameter_name``'s factors under the module holding ``parameter_names`` (registration
    order): one ``base_layer.`` per wrapper peft nests outside it, the last parameter's outermost."""
    return "base_layer." * (len(parameter_names) - 1 - parameter_names.index(parameter_name))


class LoraParameters(LoraLayer):
    """LoRA wrapper of a module whose ``parameter_names`` (one or more ``nn.Parameter``s) carry the adapters.

    Every targeted parameter of one adapter has the same ``r`` and scaling. Mixed adapter batches raise
    ``ValueError`` (peft raises too); ``add_weighted_adapter`` refuses it (as peft does).
    """

    def __init__(self, module_name: str, base_layer: nn.Module, parameter_names: list[str]) -> None:
        super().__init__(base_layer)
        is_transposed = bool(getattr(base_layer, "is_transposed", False))
        self.parameter_names = list(parameter_names)  # peft's nesting order: the innermost wrapper's first
        self.shapes = {
            name: ParameterShape(module_name, name, getattr(base_layer, name), is_transposed)
            for name in parameter_names
        }
        self.lora_A = nn.ModuleDict({name: nn.ModuleDict() for name in parameter_names})
        self.lora_B = nn.ModuleDict({name: nn.ModuleDict() for name in parameter_names})

    @staticmethod
    def check_can_hold(module_name: str, module: nn.Module, parameter_names: list[str]) -> None:
        """``ValueError`` unless a new adapter on ``parameter_names`` of ``module`` fits: the module carries no other
        kind of LoRA wrapper, and an existing ``LoraParameters`` adapts exactly these parameters (peft's rule)."""
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameters):
            raise ValueError(
                f"target_parameters: {module_name!r} already has a LoRA adapter on the module itself "
                f"({type(module).__name__}); do not also target it with target_modules"
            )
        if isinstance(module, LoraParameters) and module.parameter_names != parameter_names:
            raise ValueError(
                f"target_parameters: adapters on {module_name!r} must all target the same parameters (peft's "
                f"rule); it holds {module.parameter_names}, the new adapter targets {parameter_names}"
            )

    @property
    def weight(self) -> torch.Tensor:
        """The first targeted parameter (the module may have no ``weight``)."""
        return getattr(self.base_layer, self.parameter_names[0])

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        # Code reading the wrapped module's attributes (num_experts, act_fn, ...) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ----------------------------------------------------------------- factors
    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        for name, shape in self.shapes.items():
            rank = r * shape.num_experts
            lora_A = nn.Linear(shape.in_features, rank, bias=False)
            lora_B = nn.Linear(rank, shape.out_features, bias=False)
            if init_lora_weights is not False:
                init_default_factors(lora_A.weight, lora_B.weight, r, init_lora_weights)
            self.lora_A[name][adapter_name] = lora_A
            self.lora_B[name][adapter_name] = lora_B

    def parameter_factors(self, parameter_name: str, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r·E, in], B [out, r·E])`` of ``adapter_name`` on ``parameter_name``."""
        return self.lora_A[parameter_name][adapter_name].weight, self.lora_B[parameter_name][
            adapter_name
        ].weight

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [
            factor
            for name in self.parameter_names
            if adapter_name in self.lora_A[name]
            for factor in self.parameter_factors(name, adapter_name)
        ]

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        for name in self.parameter_names:
            parameter = getattr(self.base_layer, name)
            dtype = parameter.dtype if parameter.dtype.is_floating_point else None
            for factor in self.parameter_factors(name, adapter_name):
                factor.data = factor.data.to(device=parameter.device, dtype=dtype or factor.dtype)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """peft's keys: the last parameter's factors at ``lora_A.weight``, each earlier one a ``base_layer.``
        deeper (peft wraps once per parameter, in the order the module registers them)."""
        keys = {}
        for name in self.parameter_names:
            if adapter_name not in self.lora_A[name]:
                continue
            prefix = saved_prefix(self.parameter_names, name)
            for factor in ("lora_A", "lora_B"):
                keys[f"{prefix}{factor}.weight"] = f"{factor}.{name}.{adapter_name}.weight"
        return keys

    def delete_adapter(self, adapter_name: str) -> None:
        for name in self.parameter_names:
            for container in (self.lora_A[name], self.lora_B[name]):
                if adapter_name in container:
                    del container[adapter_name]
        super().delete_adapter(adapter_name)

    def lora_factors(self, adapter_name: str):
        raise TypeError(
            "LoRA on target_parameters has one factor pair per parameter; use parameter_factors(parameter_name, "
            "adapter_name)"
        )

    # ----------------------------------------------------------------- deltas
    def _expert_factors(self, parameter_name: str, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs [E, p, r], rhs [E, r, q])`` with ``ΔW_e = lhs_e @ rhs_e`` laid out like the parameter's
        ``[p, q]`` slices (peft's ``get_delta_factors``), in the parameter's dtype."""
        shape = self.shapes[parameter_name]
        lora_A, lora_B = self.parameter_factors(parameter_name, adapter_name)
        experts = shape.num_experts
        expert_A = lora_A.reshape(experts, -1, lora_A.shape[-1])  # [E, r, in]
        expert_B = lora_B.reshape(lora_B.shape[0], -1, experts).permute(2, 0, 1)  # [E, out, r]
        lhs, rhs = (
            (expert_A.transpose(-2, -1), expert_B.transpose(-2, -1))
            if shape.transposed
            else (expert_B, expert_A)
        )
        dtype = getattr(self.base_layer, parameter_name).dtype
        return lhs.to(dtype), rhs.to(dtype)

    def parameter_delta(self, parameter_name: str, adapter_name: str) -> torch.Tensor:
        """``s · ΔW`` of ``adapter_name`` on ``parameter_name``, shaped and typed like the parameter."""
        parameter = getattr(self.base_layer, parameter_name)
        scaling = self.scaling[adapter_name]
        if self.shapes[parameter_name].num_experts == 1 and parameter.dim() == 2:
            lora_A, lora_B = self.parameter_factors(parameter_name, adapter_name)
            return ((lora_B @ lora_A) * scaling).to(parameter.dtype)
        lhs, rhs = self._expert_factors(parameter_name, adapter_name)
        return (torch.bmm(lhs, rhs) * scaling).to(parameter.dtype)

    def _adapted(self, parameter_name: str, adapter_names: list[str]) -> torch.Tensor:
        """``W + Σ s·ΔW`` over ``adapter_names`` (a single adapter on experts: one ``baddbmm``, no ``[E, out, in]``
        temporary; peft does the same), differentiable in the factors."""
        parameter = getattr(self.base_layer, parameter_name)
        if len(adapter_names) == 1 and parameter.dim() == 3:
            lhs, rhs = self._expert_factors(parameter_name, adapter_names[0])
            return torch.baddbmm(parameter, lhs, rhs, alpha=self.scaling[adapter_names[0]])
        deltas = [self.parameter_delta(parameter_name, name) for name in adapter_names]
        return parameter + sum(deltas[1:], deltas[0])

    # ----------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        """The wrapped module's forward, with every targeted parameter adapted by the active adapters."""
        if self.routing is not None and not self.disable_adapters:
            raise ValueError(
                "lora_engine's LoRA on target_parameters does not support mixed adapter batches (adapter_names), "
                "as in peft"
            )
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if not active:
            return self.base_layer(*args, **kwargs)
        adapted = {name: self._adapted(name, active) for name in self.parameter_names}
        return functional_call(self.base_layer, adapted, args, kwargs)

    # ----------------------------------------------------------------- merging
    def check_merge_finite(self, adapter_names: list[str] | None = None) -> None:
        """As ``LoraLayer.check_merge_finite``, for every targeted parameter."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for adapter_name in names:
            if adapter_name not in self.r or adapter_name in self.merged_adapters:
                continue
            for name in self.parameter_names:
                merged = getattr(self.base_layer, name).detach() + self.parameter_delta(name, adapter_name)
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name!r} seems to be broken: "
                        f"merging it would put NaN or Inf into the parameter {name!r}; the parameters are untouched"
                    )

    @torch.no_grad()
    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        for name in self.parameter_names:
            delta = self.parameter_delta(name, adapter_name)
            parameter = getattr(self.base_layer, name)
            if subtract:
                parameter.data.sub_(delta)
            else:
                parameter.data.add_(delta)
