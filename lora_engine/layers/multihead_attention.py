"""LoRA around an ``nn.MultiheadAttention``: one adapter on the packed ``in_proj_weight [3·E, E]`` and one on
``out_proj.weight [E, E]``, always both, as peft does (``embed_dim = E``; query, key and value of the same size).

``nn.MultiheadAttention`` never calls its projections as modules (it reads ``in_proj_weight`` and
``out_proj.weight`` inside ``F.multi_head_attention_forward``), so the LoRA terms cannot be added to a projection's
output. peft merges the deltas into the base weights before each forward and unmerges them after. Here the
forward runs the base module through ``torch.func.functional_call`` with ``W + Σ s·B A`` in place of those two
weights: the same numbers, gradients flow to the factors, and the base weights are never written outside
``merge``. As in peft, dropout does not apply to these adapters (the delta acts on the weight, not on ``x``).

State-dict keys: the in-projection factors are ``lora_A`` / ``lora_B`` (peft's keys on the wrapper); the
out-projection factors are held here as ``out_proj_lora_A`` / ``out_proj_lora_B`` and saved under peft's keys
``base_layer.out_proj.lora_A`` / ``base_layer.out_proj.lora_B`` (peft nests a LoRA Linear there). In memory the
parameter names therefore differ from peft's for the out projection; the files are the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.inits import init_default_factors
from lora_engine.ops.lora_merge import lora_delta, lora_merge

#: In-memory container → the container name peft saves it under (relative to the wrapper).
_SAVED_CONTAINER = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "out_proj_lora_A": "base_layer.out_proj.lora_A",
    "out_proj_lora_B": "base_layer.out_proj.lora_B",
}


class LoraMultiheadAttention(LoraLayer):
    """LoRA wrapper of an ``nn.MultiheadAttention`` with ``_qkv_same_embed_dim`` (kdim = vdim = embed_dim).

    ``lora_A[a] [r, E]`` and ``lora_B[a] [3E, r]`` adapt ``in_proj_weight``; ``out_proj_lora_A[a] [r, E]`` and
    ``out_proj_lora_B[a] [E, r]`` adapt ``out_proj.weight``. Both pairs share ``r``, ``lora_alpha`` and scaling.
    Mixed adapter batches raise ``TypeError`` (peft does the same).
    """

    adapter_containers = ("lora_A", "lora_B", "out_proj_lora_A", "out_proj_lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                f"nn.MultiheadAttention with kdim={base_layer.kdim}, vdim={base_layer.vdim} and "
                f"embed_dim={base_layer.embed_dim}: LoRA is only supported when query, key and value have the "
                "same size (one packed in_proj_weight), as in peft"
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(
                f"out_proj of nn.MultiheadAttention must be an nn.Linear, got {type(base_layer.out_proj).__name__}"
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_proj_lora_A = nn.ModuleDict()
        self.out_proj_lora_B = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        """The packed query/key/value weight ``[3E, E]`` (an MHA has no ``weight``; this is what LoRA adapts)."""
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    def __getattr__(self, name: str):
        # Code that reads the attention's attributes (embed_dim, num_heads, batch_first, ...) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        embed_dim = self.in_features
        shapes = {"lora_A": (embed_dim, r), "lora_B": (r, 3 * embed_dim)}
        shapes |= {"out_proj_lora_A": (embed_dim, r), "out_proj_lora_B": (r, embed_dim)}
        for container_name, (in_features, out_features) in shapes.items():
            getattr(self, container_name)[adapter_name] = nn.Linear(in_features, out_features, bias=False)
        if init_lora_weights is False:  # keep nn.Linear's init: the adapter is not a no-op (for tests)
            return
        # Zeroing B draws no random numbers, so A-in then A-out are drawn in the same order as peft's.
        for lora_A, lora_B in (self.lora_factors(adapter_name), self.out_proj_factors(adapter_name)):
            init_default_factors(lora_A, lora_B, r, init_lora_weights)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, E], B [3E, r])`` of the in-projection."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def out_proj_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, E], B [E, r])`` of the out-projection."""
        return self.out_proj_lora_A[adapter_name].weight, self.out_proj_lora_B[adapter_name].weight

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        return {
            f"{_SAVED_CONTAINER[container]}.weight": f"{container}.{adapter_name}.weight"
            for container in self.adapter_containers
            if adapter_name in getattr(self, container)
        }

    # ----------------------------------------------------------------- forward
    def _adapted_weights(self, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """``{"in_proj_weight": W_in + Σ s·B A, "out_proj.weight": W_out + Σ s·B A}``, differentiable in the factors."""
        in_weight, out_weight = self.base_layer.in_proj_weight, self.base_layer.out_proj.weight
        for name in adapter_names:
            scaling = self.scaling[name]
            in_weight = in_weight + lora_delta(*self.lora_factors(name), scaling, False).to(in_weight.dtype)
            out_delta = lora_delta(*self.out_proj_factors(name), scaling, False)
            out_weight = out_weight + out_delta.to(out_weight.dtype)
        return {"in_proj_weight": in_weight, "out_proj.weight": out_weight}

    def forward(self, query: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``'s arguments and results (``(attn_output, attn_weights)``), the
        output in ``query``'s dtype. Raises ``TypeError`` inside a mixed-adapter-batch forward."""
        if self.routing is not None and not self.disable_adapters:
            raise TypeError(
                "lora_engine's LoRA on nn.MultiheadAttention does not support mixed adapter batches "
                "(adapter_names), as in peft"
            )
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if active:
            weights = self._adapted_weights(active)
            output, attn_weights = functional_call(self.base_layer, weights, (query, *args), kwargs)
        else:
            output, attn_weights = self.base_layer(query, *args, **kwargs)
        if attn_weights is not None:
            attn_weights = attn_weights.to(query.dtype)
        return output.to(query.dtype), attn_weights

    # ----------------------------------------------------------------- merging
    def check_merge_finite(self, adapter_names: list[str] | None = None) -> None:
        """As ``LoraLayer.check_merge_finite``, for both projections."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            merged = self._adapted_weights([name])
            if not all(torch.isfinite(weight).all() for weight in merged.values()):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name!r} seems to be broken: merging it "
                    "would put NaN or Inf into the in_proj_weight or out_proj.weight of MultiheadAttention; "
                    "the base weights are untouched"
                )

    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        scaling = self.scaling[adapter_name]
        out_proj = self.base_layer.out_proj
        for weight, (lora_A, lora_B) in (
            (self.base_layer.in_proj_weight, self.lora_factors(adapter_name)),
            (out_proj.weight, self.out_proj_factors(adapter_name)),
        ):
            lora_merge(weight.data, lora_A, lora_B, scaling, fan_in_fan_out=False, subtract=subtract)

    def dense_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight.detach()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` of the in-projection ``[3E, E]`` (peft's ``get_delta_weight`` of its MHA layer)."""
        delta = lora_delta(*self.lora_factors(adapter_name), self.scaling[adapter_name], False)
        return delta.to(self.base_layer.in_proj_weight.dtype)
