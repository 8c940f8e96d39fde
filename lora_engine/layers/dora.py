"""DoRA (weight-decomposed LoRA) on dense linear layers (``nn.Linear``, transformers ``Conv1D``), convolutions and
embeddings.

Every DoRA adapter has a trainable magnitude ``m``, one entry per output unit ``o`` (a row of a linear weight, an
output channel of a convolution, an embedding dimension), and the layer computes, as peft 0.21 does::

    y = b + m / ‖W + s·B A‖_o ⊙ (base term + s · low-rank term)

with the norm treated as a constant (detached, DoRA paper §4.3). Unlike peft, the norm never forms the dense
``W + s·B A``: ``ops.dora_norm`` derives it from a cached ``‖W_o‖²`` and rank-sized products, on the weight seen
as a matrix ``[out, in·kernel]`` (a convolution) or ``[in, out]`` (``Conv1D``, an embedding). A layer may hold
plain LoRA adapters next to DoRA ones; those run the plain path unchanged.

peft's quirks kept for parity: with several active adapters each DoRA adapter rescales everything computed before
it (peft feeds the running result in as its "base output"); with dropout in training the base term is recomputed
on the dropped input. Merging writes ``m / ‖W + ΔW‖ ⊙ (W + ΔW)`` into the weight, the norm taken on the weight
with earlier merged adapters taken out (as the forward sees it), and keeps the norm so that unmerging can divide
it out again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine.layers.base import LoraLayer
from lora_engine.layers.conv import LoraConv
from lora_engine.layers.dense import LoraLinear
from lora_engine.layers.embedding import LoraEmbedding
from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm
from lora_engine.ops.lora_linear import lora_linear

MAGNITUDE = "lora_magnitude_vector"


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude as ``.weight``, so state-dict keys match peft's DoRA layers."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class DoraMixin:
    """DoRA bookkeeping shared by the wrappers; a subclass says how its weight reads as a matrix."""

    #: The weight is stored ``[in, out]`` as a matrix (``Conv1D``, ``nn.Embedding``).
    matrix_is_transposed = False
    #: The plain wrapper class this DoRA class extends (``promote`` takes exactly that class).
    plain_class: type

    def _init_dora_state(self) -> None:
        self.lora_magnitude_vector = nn.ModuleDict()
        self._merge_norms: dict[str, torch.Tensor] = {}  # norm each merged DoRA adapter was merged with
        self._weight_sq_norm: tuple[tuple, torch.Tensor] | None = None  # (weight identity, ‖W_o‖²)

    @classmethod
    def promote(cls, layer: LoraLayer) -> LoraLayer:
        """Turn the plain wrapper ``layer`` (already in the model, maybe holding adapters) into this DoRA class
        in place, so a DoRA adapter can join plain ones on the same layer; returns the same object."""
        if type(layer) is not cls.plain_class:
            raise TypeError(f"a {type(layer).__name__} cannot become a {cls.__name__}")
        layer.__class__ = cls
        layer._init_dora_state()
        return layer

    # ------------------------------------------------------------------ adapters
    def add_dora_adapter(self, adapter_name: str, r: int, *settings) -> None:
        """``add_adapter``, then the magnitude ``m = ‖W + s·B A‖_o`` (peft's direct norm: once per adapter, and
        equal to peft's init), frozen until the adapter is activated."""
        self.add_adapter(adapter_name, r, *settings)
        with torch.no_grad():
            merged = self._as_matrix(self.dense_weight()).float() + self._delta_matrix(adapter_name)
            magnitude = torch.linalg.norm(merged, dim=1).to(self.lora_factors(adapter_name)[0].dtype)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude.view(self.magnitude_shape()))
        self.lora_magnitude_vector[adapter_name].weight.requires_grad_(False)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (-1,)

    def is_dora(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_magnitude_vector

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """As ``LoraLayer``'s, but the magnitude is saved as ``lora_magnitude_vector`` (no ``.weight``), as peft
        saves it."""
        keys = super().adapter_state_keys(adapter_name)
        in_memory = keys.pop(f"{MAGNITUDE}.weight", None)
        if in_memory is not None:
            keys[MAGNITUDE] = in_memory
        return keys

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_norms.pop(adapter_name, None)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Without a DoRA adapter among the routed ones, the plain wrapper's grouped path. With one, each adapter
        runs its own rows: ``_add_adapter_output`` on those samples of the base output, so row ``b`` gets what a
        forward with ``adapter_names[b]`` alone computes (DoRA's rescaling is per adapter, which one grouped
        low-rank pass cannot express). peft refuses DoRA in mixed batches."""
        if not any(self.is_dora(name) for name in self.routing.names):
            return super()._mixed_batch_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        held = [name for name in self.routing.names if name in self.r]
        self.routing.check_batch(x.shape[0], type(self.base_layer).__name__)
        for name, rows in self.routing.rows_by_adapter(held, x.device):
            updated = self._add_adapter_output(x[rows], result[rows], name)
            result = result.index_copy(0, rows, updated.to(result.dtype))
        return result

    # ------------------------------------------------------------------ norms
    def row_norm(self, adapter_name: str) -> torch.Tensor:
        """``‖W + s·B A‖`` per output unit of ``adapter_name``, fp32 ``[out]``, detached."""
        lora_A, lora_B = self._factor_matrices(adapter_name)
        return dora_norm(
            self._stored_matrix(self.dense_weight()),
            self._cached_weight_sq_norm(),
            lora_A.detach(),
            lora_B.detach(),
            self.scaling[adapter_name],
            self.matrix_is_transposed,
        )

    def dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ‖W + s·B A‖``, shaped like the magnitude; gradients flow to ``m`` only."""
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return magnitude / self.row_norm(adapter_name).view(magnitude.shape)

    def _cached_weight_sq_norm(self) -> torch.Tensor:
        # Keyed on the weight's storage and in-place version; merges write through `.data` (which does not bump
        # the version), so `_apply_delta` also drops the cache explicitly.
        weight = self.base_layer.weight
        identity = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if self._weight_sq_norm is None or self._weight_sq_norm[0] != identity:
            matrix = self._stored_matrix(self.dense_weight())
            self._weight_sq_norm = (identity, weight_row_sq_norm(matrix, self.matrix_is_transposed))
        return self._weight_sq_norm[1]

    # ------------------------------------------------------------------ merging
    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        self._weight_sq_norm = None
        if not self.is_dora(adapter_name):
            super()._apply_delta(adapter_name, subtract)
            return
        if subtract:
            norm = self._merge_norms.pop(adapter_name)
            self._write_weight(self._dora_unmerged(self.dense_weight(), adapter_name, norm))
            return
        merged, norm = self._dora_merged(adapter_name)
        self._write_weight(merged)
        self._merge_norms[adapter_name] = norm

    def merged_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging ``adapter_name`` would make the base weight (``check_merge_finite`` reads it)."""
        if not self.is_dora(adapter_name):
            return super().merged_weight(adapter_name)
        return self._dora_merged(adapter_name)[0]

    def _dora_merged(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m/‖W₀ + ΔW‖ ⊙ (W + ΔW), ‖W₀ + ΔW‖)``: W the current weight, W₀ it with merged adapters taken out,
        as the forward sees it (peft's rule)."""
        weight = self.dense_weight()
        with torch.no_grad():
            delta = self._delta_matrix(adapter_name)
            norm = torch.linalg.norm(self._as_matrix(self._unmerged_weight()).float() + delta, dim=1)
            merged = self._dora_factor(adapter_name, norm) * (self._as_matrix(weight).float() + delta)
        return self._from_matrix(merged, weight.shape).to(weight.dtype), norm

    def _write_weight(self, weight: torch.Tensor) -> None:
        """Make ``weight`` (laid out as ``dense_weight()``) the base layer's weight."""
        self.base_layer.weight.data = weight

    def _dora_unmerged(self, weight: torch.Tensor, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        """``W'/(m/norm) − ΔW``: the weight before ``adapter_name`` was merged with ``norm``."""
        with torch.no_grad():
            factor = self._dora_factor(adapter_name, norm)
            unmerged = self._as_matrix(weight).float() / factor - self._delta_matrix(adapter_name)
        return self._from_matrix(unmerged, weight.shape).to(weight.dtype)

    def _unmerged_weight(self) -> torch.Tensor:
        """A copy of the base weight with every merged adapter taken out again, last merged first."""
        weight = self.dense_weight().clone()
        for name in reversed(self.merged_adapters):
            if self.is_dora(name):
                weight = self._dora_unmerged(weight, name, self._merge_norms[name])
            else:
                weight -= self.get_delta_weight(name)
        return weight

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        magnitude = self.lora_magnitude_vector[adapter_name].weight.detach().float().reshape(-1)
        return (magnitude / norm).view(-1, 1)

    # ------------------------------------------------------------------ the weight as a matrix
    def _stored_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the 2-D matrix ``dora_norm`` reads (``[in, out]`` when ``matrix_is_transposed``)."""
        return weight

    def _as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as ``[out, in]``."""
        matrix = self._stored_matrix(weight)
        return matrix.T if self.matrix_is_transposed else matrix

    def _from_matrix(self, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of ``_as_matrix``: ``[out, in]`` back to the layout of a weight of ``shape``."""
        stored = matrix.T if self.matrix_is_transposed else matrix
        return stored.reshape(shape)

    def _factor_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` as matrices."""
        return self.lora_factors(adapter_name)

    def _delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` as fp32 ``[out, in]``."""
        lora_A, lora_B = self._factor_matrices(adapter_name)
        return (lora_B.detach().float() @ lora_A.detach().float()) * self.scaling[adapter_name]


class DoraLinear(DoraMixin, LoraLinear):
    """``LoraLinear`` whose adapters may be DoRA adapters (those with an entry in ``lora_magnitude_vector``)."""

    adapter_containers = ("lora_A", "lora_B", MAGNITUDE)
    plain_class = LoraLinear

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora_state()
        self.matrix_is_transposed = self.fan_in_fan_out

    @classmethod
    def promote(cls, layer: LoraLayer) -> LoraLayer:
        promoted = super().promote(layer)
        promoted.matrix_is_transposed = promoted.fan_in_fan_out
        return promoted

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor | None, name: str) -> torch.Tensor:
        if not self.is_dora(name):
            return super()._add_adapter_output(x, result, name)
        lora_A, lora_B = self.lora_factors(name)
        scaling = self.scaling[name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = self.dora_scale(name)  # [out]
        out_dtype = weight.dtype if result is None else result.dtype
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        if dropout_p > 0.0:
            if result is None:
                result = self.base_layer(x)
            dropped = F.dropout(x, dropout_p, training=True)
            base_dropped = F.linear(dropped, weight.T if self.fan_in_fan_out else weight)
            low_rank = lora_linear(dropped, None, None, lora_A, lora_B, scaling)
            return (result + (scale - 1) * base_dropped + scale * low_rank).to(out_dtype)
        if result is None:  # x Wᵀ + s·(x Aᵀ) Bᵀ in one op
            unscaled = lora_linear(x, weight, None, lora_A, lora_B, scaling, 0.0, self.fan_in_fan_out)
        else:
            without_bias = result if bias is None else result - bias
            unscaled = without_bias + lora_linear(x, None, None, lora_A, lora_B, scaling)
        output = scale * unscaled
        return (output if bias is None else output + bias).to(out_dtype)


class DoraConv(DoraMixin, LoraConv):
    """``LoraConv`` with DoRA adapters; the magnitude is ``[1, out, 1, …]`` as in peft."""

    adapter_containers = ("lora_A", "lora_B", MAGNITUDE)
    plain_class = LoraConv

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora_state()

    def add_dora_adapter(self, adapter_name: str, r: int, *settings) -> None:
        if self.base_layer.groups > 1:
            raise ValueError(
                f"use_dora=True on a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: DoRA on "
                "grouped convolutions is not supported yet by lora_engine"
            )
        super().add_dora_adapter(adapter_name, r, *settings)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)

    def _stored_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _factor_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A, lora_B = self.lora_factors(adapter_name)
        return lora_A.reshape(lora_A.shape[0], -1), lora_B.reshape(lora_B.shape[0], -1)

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if not self.is_dora(name):
            return super()._add_adapter_output(x, result, name)
        scale = self.dora_scale(name)  # [1, out, 1, …]
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        if dropout_p > 0.0:
            dropped = F.dropout(x.to(self.lora_A[name].weight.dtype), dropout_p, training=True)
            base_dropped = self.base_layer._conv_forward(dropped, self.base_layer.weight, None)
            low_rank = self.lora_B[name](self.lora_A[name](dropped)) * self.scaling[name]
            return result + (scale - 1) * base_dropped + scale * low_rank
        bias = self.base_layer.bias
        bias = None if bias is None else bias.view(scale.shape)
        without_bias = result if bias is None else result - bias
        output = scale * (without_bias + self._low_rank(x, name))
        return output if bias is None else output + bias


class DoraEmbedding(DoraMixin, LoraEmbedding):
    """``LoraEmbedding`` with DoRA adapters; one magnitude per embedding dimension (norms over the vocabulary)."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B", MAGNITUDE)
    plain_class = LoraEmbedding
    matrix_is_transposed = True  # the weight is [num_embeddings, dim]: "in" is the vocabulary

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora_state()

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if not self.is_dora(name):
            return super()._add_adapter_output(x, result, name)
        return self.dora_scale(name) * (result + self._low_rank(x, name))


DORA_CLASSES: dict[type, type] = {LoraLinear: DoraLinear, LoraConv: DoraConv, LoraEmbedding: DoraEmbedding}
