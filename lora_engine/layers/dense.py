"""LoRA around a dense linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2, weight ``[in, out]``).

``y = x Wᵀ + b + Σ_active s_a · (drop_a(x) A_aᵀ) B_aᵀ``, with ``A_a [r, in]`` and ``B_a [out, r]`` stored as
``lora_A[a]`` / ``lora_B[a]`` (``nn.Linear`` modules, so state-dict keys match peft's).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.initialization.loftq_config import LoftQConfig
from lora_engine.layers import inits
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.corda_init import corda_factors
from lora_engine.layers.loftq import loftq_factors
from lora_engine.ops.grouped_lora import grouped_lora, runs_segmented
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.reference.grouped_lora import segmented_lora
from lora_engine.reference.lora_linear import base_output


class LoraLinear(LoraLayer):
    """LoRA wrapper of an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.delta_is_transposed = self.fan_in_fan_out
        in_features, out_features = base_layer.weight.shape[::-1]
        if self.fan_in_fan_out:
            in_features, out_features = out_features, in_features
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=self.lora_bias[adapter_name])
        lora_A, lora_B = self.lora_factors(adapter_name)
        if init_lora_weights is False:  # keep nn.Linear's init: the adapter is not a no-op (for tests)
            return
        if inits.is_weight_derived(init_lora_weights):
            self._weight_derived_init(adapter_name, r, init_lora_weights)
            return
        if isinstance(init_lora_weights, LoftQConfig):
            self._loftq_init(adapter_name, r, init_lora_weights)
            return
        inits.init_default_factors(lora_A, lora_B, r, init_lora_weights)
        if self.lora_bias[adapter_name]:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Read on every forward: the ModuleDicts' own dicts, not their Python-level __getattr__ / __getitem__.
        lora_A, lora_B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        return lora_A[adapter_name].weight, lora_B[adapter_name].weight

    def _weight_derived_init(self, adapter_name: str, r: int, init: str) -> None:
        """PiSSA, OLoRA or orthogonal factors (``layers.inits``); PiSSA and OLoRA replace the base weight by the
        residual ``W − s·B A``, so the adapted layer starts equal to the original one."""
        weight = self.base_layer.weight
        if init == "orthogonal":
            lora_A, lora_B = inits.orthogonal(self.in_features, self.out_features, r, weight.dtype)
        else:
            if init == "corda":
                lora_A, lora_B, residual = self._corda_factors(r, self.scaling[adapter_name])
            elif init == "olora":
                if self.fan_in_fan_out:
                    raise ValueError(
                        "init_lora_weights='olora' on a transformers Conv1D (fan_in_fan_out) is not supported "
                        "yet by lora_engine: peft's OLoRA factors its [in, out] weight into factors of the wrong shape"
                    )
                lora_A, lora_B, residual = inits.olora(weight, r, self.scaling[adapter_name])
            else:
                lora_A, lora_B, residual = inits.pissa(
                    weight, r, self.scaling[adapter_name], init, self.fan_in_fan_out
                )
            weight.data = residual
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B

    def _corda_factors(self, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CorDA's factors from the ``eigens`` that ``preprocess_corda`` left on the base layer, which are
        then deleted (peft does the same). ``ValueError`` if there are none."""
        eigens = getattr(self.base_layer, "eigens", None)
        if eigens is None:
            raise ValueError(
                "`eigens` attribute not found for layer, please run `preprocess_corda` first "
                "(lora_engine.preprocess_corda(model, lora_config, run_model=...)) on the model before get_peft_model."
            )
        factors = corda_factors(self.base_layer.weight, eigens, r, scaling, self.fan_in_fan_out)
        del self.base_layer.eigens
        return factors

    def _loftq_init(self, adapter_name: str, r: int, settings: LoftQConfig) -> None:
        """LoftQ factors (``layers.loftq``): the base weight becomes its dequantized quantized self ``Q`` and
        ``B A ≈ W − Q``. The forward adds ``s·B A``, so the layer starts nearest ``W`` when ``s = 1``; peft does
        not fold ``s`` into the factors either."""
        if self.fan_in_fan_out:
            raise ValueError(
                "init_lora_weights='loftq' on a transformers Conv1D (fan_in_fan_out) is not supported yet by "
                "lora_engine: peft's LoftQ factors its [in, out] weight into factors of the wrong shape"
            )
        weight = self.base_layer.weight
        dequantized, lora_A, lora_B = loftq_factors(weight, settings.loftq_bits, r, settings.loftq_iter)
        weight.data = dequantized
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [..., in]`` → ``[..., out]`` in the base layer's dtype."""
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        result = None
        for name in active:
            result = self._add_adapter_output(x, result, name)
        return result

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor | None, name: str) -> torch.Tensor:
        """``result`` plus adapter ``name``'s term; ``result`` None means nothing computed yet, then the base
        layer's output is computed in the same call."""
        lora_A, lora_B = self.lora_factors(name)
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        if result is None:
            weight, bias = self.base_layer.weight, self.base_layer.bias
            result = lora_linear(
                x, weight, bias, lora_A, lora_B, self.scaling[name], dropout_p, self.fan_in_fan_out
            )
            return self._plus_lora_bias(result, name)
        delta = lora_linear(x, None, None, lora_A, lora_B, self.scaling[name], dropout_p)
        return self._plus_lora_bias(result + delta, name).to(result.dtype)

    def _plus_lora_bias(self, output: torch.Tensor, name: str) -> torch.Tensor:
        """``output + s · lora_B.bias`` for a ``lora_bias`` adapter (the op has no bias for B), else ``output``."""
        lora_B_bias = self.lora_B[name].bias
        if lora_B_bias is None:
            return output
        return (output + lora_B_bias * self.scaling[name]).to(output.dtype)

    def _mixed_batch_base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output for a mixed batch. On the CPU, for an ``nn.Linear`` or ``Conv1D`` base itself,
        computed as the single-adapter path computes it (``reference.lora_linear.base_output``: oneDNN for fp32,
        within fp32 rounding of ``F.linear``), so that a mixed batch runs its base as fast as one adapter does."""
        base = self.base_layer
        plain = type(base) is nn.Linear or type(base) is Conv1D  # not bitsandbytes' subclasses of nn.Linear
        if args or kwargs or x.device.type != "cpu" or not plain:
            return base(x, *args, **kwargs)
        rows = base_output(x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.fan_in_fan_out)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of ``x [B, ..., in]`` gets the adapter ``self.routing`` assigns it, in one grouped call."""
        result = self._mixed_batch_base_output(x, *args, **kwargs)
        with_bias = [name for name in self.routing.names if self.lora_bias.get(name)]
        if with_bias:
            raise ValueError(
                f"Cannot pass `adapter_names` for adapters with lora_bias=True ({with_bias}): lora_engine does not "
                "support lora_bias in mixed-adapter batches of linear layers yet"
            )
        held = self.routing.held_by(self.r)
        if not held:
            return result
        self.routing.check_batch(x.shape[0], type(self.base_layer).__name__)
        in_place = not torch.is_grad_enabled() and result.is_contiguous()
        if runs_segmented(x.device):
            # The factors as stored, one span of rows per adapter: nothing stacked or padded per forward.
            segments = self.routing.row_segments_for(held)
            if not segments.spans:
                return result
            factors = {index: self.lora_factors(held[index]) for index in segments.adapters}
            scales = [self.scaling[name] for name in held]
            if in_place:
                return segmented_lora(x, segments, factors, scales, out=result)
            return (result + segmented_lora(x, segments, factors, scales)).to(result.dtype)
        stacked = self.stacked_factors(self.routing, x.device)
        if not in_place:
            return (result + grouped_lora(x, *stacked)).to(result.dtype)
        # Inference (generate: every decode step): add into the fresh base output in place, the tokens grouped by
        # adapter once per forward; the kernels do no work for base-only rows.
        segments = self.routing.segments_for(stacked[0], math.prod(x.shape[1:-1]), stacked[1].shape[0])
        return grouped_lora(x, *stacked, out=result, segments=segments)
