"""LoRA around an ``nn.Embedding``: ``y = E[x] + s · A[:, x]ᵀ Bᵀ``.

``lora_embedding_A[a]`` is ``[r, num_embeddings]`` and ``lora_embedding_B[a]`` is ``[embedding_dim, r]``
(``nn.Parameter`` entries, so state-dict keys match peft's). Embedding adapters never apply dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine.layers.base import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA wrapper of an ``nn.Embedding`` (including subclasses that scale their output by ``embed_scale``)."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")
    delta_is_transposed = True  # B A is [dim, num_embeddings]; the weight is [num_embeddings, dim]

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_factors(self, adapter_name: str, r: int, init_lora_weights) -> None:
        lora_A = torch.randn(r, self.in_features)
        lora_B = torch.randn(self.out_features, r)
        if init_lora_weights is not False:  # peft: A = 0, B ~ N(0, 1), so the delta starts at zero
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_B)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Token ids ``x [...]`` → ``[..., embedding_dim]`` in the base layer's dtype."""
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        result = self.base_layer(x, *args, **kwargs)
        active = self._adapters_to_run()
        if not active:
            return result
        summed = result
        for name in active:
            summed = self._add_adapter_output(x, summed, name)
        return summed.to(result.dtype)

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the output so far) plus adapter ``name``'s term."""
        return result + self._low_rank(x, name)

    def _low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s · A[:, x]ᵀ Bᵀ``, times the base's ``embed_scale`` if it has one."""
        base = self.base_layer
        lookup = (base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        lora_A, lora_B = self.lora_factors(name)
        after_A = F.embedding(x, lora_A.T, *lookup)  # [..., r]
        return self._scaled((after_A @ lora_B.T) * self.scaling[name])

    def _scaled(self, delta: torch.Tensor) -> torch.Tensor:
        # Embeddings that scale their output (Gemma's embed_scale) scale the LoRA term too, as peft does.
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        return delta * embed_scale.to(delta.dtype) if isinstance(embed_scale, torch.Tensor) else delta

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of token ids ``x [B, ...]`` gets the adapter ``self.routing`` assigns it."""
        result = self.base_layer(x, *args, **kwargs)
        delta = self._mixed_batch_delta(x)
        return result if delta is None else (result + self._scaled(delta)).to(result.dtype)

    def _mixed_batch_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row of token ids ``x [B, ...]`` looks up its own adapter's ``A`` columns, then one batched matmul."""
        stacked = self.stacked_factors(self.routing, x.device)
        if stacked is None:
            return None
        self.routing.check_batch(x.shape[0], type(self.base_layer).__name__)
        row_adapter, lora_A, lora_B, scaling = stacked
        index = row_adapter.clamp(min=0)
        tokens = x.reshape(x.shape[0], -1)  # [B, T]
        after_A = lora_A.transpose(1, 2)[index[:, None], tokens]  # [B, T, r]
        row_scale = torch.where(row_adapter >= 0, scaling[index], torch.zeros_like(scaling[index]))
        delta = torch.bmm(after_A, lora_B[index].transpose(1, 2)) * row_scale.to(lora_A.dtype)[:, None, None]
        return delta.reshape(*x.shape, self.out_features)
