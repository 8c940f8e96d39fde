"""``trainable_token_indices``: a few rows of an embedding matrix trained in full (peft's trainable tokens), e.g.
the rows of tokens a user added to the vocabulary.

Per adapter the wrapper holds ``trainable_tokens_delta[a] [n, dim]``, the new values of rows ``token_indices[a]``
(initialised to the current rows, so the model starts unchanged), and a frozen copy of the original rows for
unmerging. The forward looks up (or, for a tied ``lm_head``, multiplies by) ``W`` with those rows replaced:
``W.index_copy(0, rows, delta)``, so gradients reach only the trained rows and ``W`` is written by ``merge`` only.

When the output embedding shares its weight with the input embedding (``tie_word_embeddings``), it is wrapped too,
sharing the input wrapper's rows, as peft does; only the input wrapper's rows are saved. Saved keys are peft's:
``<embedding>.token_adapter.trainable_tokens_delta``.

The wrappers subclass ``LoraLayer`` for its registry (activate, disable, delete, merge, unload); ``r`` holds the
number of trained rows per adapter (they have no rank) and no scaling is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine.layers.base import LoraLayer
from lora_engine.module_tree import replace_submodule


class TrainableTokens(LoraLayer):
    """Trainable rows of an ``nn.Embedding`` or of a tied output ``nn.Linear`` (weight ``[vocab, dim]``).

    ``tied_to`` makes this wrapper share (not copy) another wrapper's rows and indices; it then saves nothing.
    Mixed adapter batches raise ``ValueError``.
    """

    def __init__(self, base_layer: nn.Embedding | nn.Linear, tied_to: TrainableTokens | None = None) -> None:
        super().__init__(base_layer)
        self._tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
            self.trainable_tokens_original = tied_to.trainable_tokens_original

    def add_tokens(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Make rows ``token_indices`` of the weight trainable for ``adapter_name`` (frozen until activated).

        ``init_weights=False`` starts them from ``randn`` (peft's debugging option). ``ValueError`` for an index
        outside the vocabulary. A tied wrapper registers the adapter only (its rows live in the tied wrapper).
        """
        weight = self.base_layer.weight
        if self._tied_to:
            self.r[adapter_name] = len(self.token_indices[adapter_name])
            return
        bad = [index for index in token_indices if not 0 <= int(index) < weight.shape[0]]
        if bad:
            raise ValueError(
                f"trainable_token_indices {bad} are outside the embedding's {weight.shape[0]} rows; indices must be "
                f"in [0, {weight.shape[0]})"
            )
        self.token_indices[adapter_name] = [int(index) for index in token_indices]
        originals = weight.detach()[self.token_indices[adapter_name]].clone()
        values = originals.clone() if init_weights else torch.randn_like(originals)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=False)
        self.trainable_tokens_original[adapter_name] = originals
        self.r[adapter_name] = len(token_indices)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        if self._tied_to or adapter_name not in self.trainable_tokens_delta:
            return []
        return [self.trainable_tokens_delta[adapter_name]]

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        if self._tied_to or adapter_name not in self.trainable_tokens_delta:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"trainable_tokens_delta.{adapter_name}"}

    def delete_adapter(self, adapter_name: str) -> None:
        if not self._tied_to and adapter_name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter_name]
            del self.token_indices[adapter_name]
            del self.trainable_tokens_original[adapter_name]
        super().delete_adapter(adapter_name)

    # ----------------------------------------------------------------- forward
    def _weight_with_tokens(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with each adapter's rows replaced (later adapters win on shared rows, as in peft)."""
        weight = self.base_layer.weight
        for name in adapter_names:
            rows = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, rows, self.trainable_tokens_delta[name].to(weight))
        return weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Token ids ``[...]`` → ``[..., dim]`` (embedding), or hidden states ``[..., dim]`` → ``[..., vocab]``."""
        if self.routing is not None and not self.disable_adapters:
            raise ValueError(
                "lora_engine's trainable tokens do not support mixed adapter batches (adapter_names)"
            )
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        weight = self._weight_with_tokens(active)
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        result = F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq
        )
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings, as peft does
        return result * embed_scale.to(result.dtype) if isinstance(embed_scale, torch.Tensor) else result

    # ----------------------------------------------------------------- merging
    def check_merge_finite(self, adapter_names: list[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            pending = name in self.r and name not in self.merged_adapters
            if pending and not torch.isfinite(self.trainable_tokens_delta[name]).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name!r} seems to be broken: its trainable "
                    f"token rows hold NaN or Inf; the {type(self.base_layer).__name__} weight is untouched"
                )

    @torch.no_grad()
    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        weight = self.base_layer.weight.data
        rows = torch.tensor(self.token_indices[adapter_name], device=weight.device)
        source = self.trainable_tokens_original if subtract else self.trainable_tokens_delta
        weight.index_copy_(0, rows, source[adapter_name].to(weight))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging adds to the base weight: the new rows minus the current ones, zero elsewhere."""
        weight = self.base_layer.weight.detach()
        return self._weight_with_tokens([adapter_name]).detach() - weight


def inject_trainable_tokens(
    model: nn.Module, adapter_name: str, token_indices: list[int] | dict[str, list[int]], created: list
) -> None:
    """Wrap the embeddings ``token_indices`` names (a list: the input embedding) and add ``adapter_name`` to them.

    A dict maps module names (exact or ``.``-suffix) to indices. A tied output embedding (same weight object as the
    input embedding, with the same indices) shares the input wrapper's rows. New wrappers are appended to
    ``created`` as ``(name, wrapper)`` for roll-back. ``ValueError`` naming the entry for an unknown module or one of
    another kind than ``nn.Embedding`` / ``nn.Linear``.
    """
    names = [name for name, _ in model.named_modules()]
    inputs = model.get_input_embeddings()
    input_name = next(name for name, module in model.named_modules() if module is inputs)
    requested = token_indices if isinstance(token_indices, dict) else {input_name: token_indices}
    input_wrapper = None
    for entry, indices in requested.items():
        matches = [name for name in names if name == entry or name.endswith(f".{entry}")]
        matches = [name for name in matches if not any(name.startswith(f"{other}.") for other in matches)]
        if not matches:
            raise ValueError(f"trainable_token_indices names {entry!r}, which is no module of the model")
        for module_name in matches:
            wrapper = _wrapper_at(model, module_name, created)
            wrapper.add_tokens(adapter_name, indices)
            if module_name == input_name:
                input_wrapper = wrapper
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if input_wrapper is None or outputs is None:
        return
    if isinstance(outputs, TrainableTokens) and outputs._tied_to and outputs._tied_to[0] is input_wrapper:
        outputs.add_tokens(adapter_name, input_wrapper.token_indices[adapter_name])
    elif type(outputs) is nn.Linear and outputs.weight is input_wrapper.base_layer.weight:
        output_name = next(name for name, module in model.named_modules() if module is outputs)
        tied = TrainableTokens(outputs, tied_to=input_wrapper)
        replace_submodule(model, output_name, tied)
        created.append((output_name, tied))
        tied.add_tokens(adapter_name, input_wrapper.token_indices[adapter_name])


def _wrapper_at(model: nn.Module, module_name: str, created: list) -> TrainableTokens:
    module = model.get_submodule(module_name)
    if isinstance(module, TrainableTokens):
        return module
    if isinstance(module, LoraLayer) or not isinstance(module, nn.Embedding | nn.Linear):
        raise ValueError(
            f"trainable_token_indices on {module_name!r} ({type(module).__name__}): trainable tokens are supported "
            "on a plain torch.nn.Embedding (or a tied nn.Linear output layer) that carries no LoRA adapter"
        )
    wrapper = TrainableTokens(module)
    replace_submodule(model, module_name, wrapper)
    created.append((module_name, wrapper))
    return wrapper
