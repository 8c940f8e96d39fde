"""PyTorch mixed-adapter batch, two ways with the same result (tested against each other):

- on the CPU, rows segmented by adapter (``row_segments``, ``segmented_lora``): the routing is read on the host
  once per forward (``tolist()``, free for a CPU tensor) into the rows of each adapter present. An adapter whose
  rows sit together in the batch (one adapter, one row per adapter, rows sent in adapter order) works on a
  slice of ``x`` and of the output and adds its term in place by one ``mm`` and one ``addmm_``: no copy of
  anything. An adapter whose rows are apart gathers them (``index_select``), runs the same two matmuls and adds
  them back (``index_add_``): transients of one adapter's rows at a time, as in the peft loop, so the peak
  stays at peft's. The work is the peft loop's (each token meets one adapter), the factors are read where they
  are stored (no stacking, no padding to the largest rank), and base-only rows do nothing;
- elsewhere, with no host sync: each row's factors gathered, then two batched matmuls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor | None = None,
    segments: RowSegments | None = None,
) -> torch.Tensor:
    """``ops.grouped_lora`` in PyTorch; see its docstring for the contract.

    ``out`` (CPU only, contiguous ``[B, ..., out]``, no autograd): ``out += delta`` in place, returned. Without
    it, returns ``delta`` in the adapters' dtype. ``segments``: ``row_segments(row_adapter, n)``, computed once
    per forward by the caller, else here (CPU only).
    """
    if x.device.type == "cpu":
        if segments is None:
            segments = row_segments(row_adapter, lora_A.shape[0])
        if out is None and not segments.spans:
            return x.new_zeros((*x.shape[:-1], lora_B.shape[1]), dtype=lora_A.dtype)
        factors = {adapter: (lora_A[adapter], lora_B[adapter]) for adapter in segments.adapters}
        return segmented_lora(x, segments, factors, scaling.tolist(), out)
    if out is not None:
        raise ValueError(f"reference grouped_lora: out= is for CPU tensors; x is on {x.device}")
    return _gathered_per_row(x, row_adapter, lora_A, lora_B, scaling)


def _gathered_per_row(x, row_adapter, lora_A, lora_B, scaling) -> torch.Tensor:
    batch, in_features = x.shape[0], x.shape[-1]
    tokens_per_row = math.prod(x.shape[1:-1])
    rows = x.to(lora_A.dtype).reshape(batch, tokens_per_row, in_features)  # [B, T, in]
    # Rows outside the stack (-1) borrow adapter 0's factors and have their rank-sized hidden [B, T, r] zeroed
    # (``where``, so even an overflowed product becomes an exact 0). The scaling is applied there too, the
    # smallest tensor on the way: no scaled copy of B, no zero adapter appended to the stacks, and no extra
    # pass over the [B, T, out] result.
    routed = row_adapter >= 0
    index = row_adapter.clamp(min=0)
    hidden = torch.bmm(rows, lora_A[index].transpose(1, 2))  # [B, T, r]
    row_scaling = scaling.to(lora_A.dtype)[index][:, None, None]
    hidden = torch.where(routed[:, None, None], hidden * row_scaling, 0.0)
    delta = torch.bmm(hidden, lora_B[index].transpose(1, 2))  # [B, T, out]
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])


@dataclass(frozen=True)
class RowSegments:
    """The batch rows of a routing by adapter, for ``segmented_lora``.

    ``spans``: ``(adapter, rows)`` for each adapter that some row runs, in adapter order; ``rows`` is a ``slice``
    of the batch where that adapter's rows are consecutive, else their indices (int64 ``[n]``, ascending). Rows
    running no adapter are in no span.
    """

    spans: tuple[tuple[int, slice | torch.Tensor], ...]

    @property
    def adapters(self) -> list[int]:
        return [adapter for adapter, _ in self.spans]


def row_segments(row_adapter: torch.Tensor | Sequence[int], adapters: int) -> RowSegments:
    """``RowSegments`` of a ``[B]`` routing into ``adapters`` adapters (-1, or any negative value: the base
    model alone). Host work only; compute it once per forward for every layer holding the same adapters.
    Raises ``IndexError`` for an adapter ``>= adapters``."""
    rows_of: dict[int, list[int]] = {}
    routing = row_adapter.tolist() if isinstance(row_adapter, torch.Tensor) else row_adapter
    for row, adapter in enumerate(routing):
        if adapter >= adapters:
            raise IndexError(f"grouped_lora: row {row} runs adapter {adapter}; only {adapters} are stacked")
        if adapter >= 0:
            rows_of.setdefault(adapter, []).append(row)
    spans = []
    for adapter in sorted(rows_of):
        rows = rows_of[adapter]
        together = rows[-1] - rows[0] == len(rows) - 1
        spans.append((adapter, slice(rows[0], rows[-1] + 1) if together else torch.tensor(rows)))
    return RowSegments(tuple(spans))


def segmented_lora(
    x: torch.Tensor,
    segments: RowSegments,
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]],
    scales: Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``delta[b] = s_i · (x[b] A_iᵀ) B_iᵀ`` for the rows of each span of ``segments`` (adapter ``i``), 0 for the
    rows in none; computed in the factors' dtype.

    ``x``: ``[B, ..., in]`` on the CPU. ``factors``: ``{adapter: (A [r_i, in], B [out, r_i])}`` for every adapter
    of ``segments`` (ranks may differ; one dtype); ``scales``: indexed by adapter. Without ``out`` returns
    ``delta [B, ..., out]`` (autograd flows to ``x`` and the factors). With ``out`` (``[B, ..., out]``,
    contiguous, any float dtype, no autograd): ``out += delta`` in place, rounded as ``(out +
    delta).to(out.dtype)``; rows in no span are not touched; returns ``out``. Raises ``ValueError`` without
    ``out`` when no row runs an adapter (there is nothing to compute the dtype of the zeros from).
    """
    if not segments.spans:
        if out is None:
            raise ValueError("segmented_lora: no row runs an adapter; pass out= or skip the call")
        return out
    batch, in_features = x.shape[0], x.shape[-1]
    tokens_per_row = math.prod(x.shape[1:-1])
    dtype = factors[segments.spans[0][0]][1].dtype
    out_features = factors[segments.spans[0][0]][1].shape[0]
    # Rows as [B, T·features]: index_select / index_add_ along dim 0 of a 3-d [B, T, features] view take a
    # scatter path that measured several times slower than over the same memory seen as 2-d rows.
    x_rows = x.reshape(batch, tokens_per_row * in_features)
    if out is None:
        return _segmented_delta(x_rows, segments, factors, scales, x.shape, out_features, dtype)
    out_rows = out.view(batch, tokens_per_row * out_features)
    x_tokens, out_tokens = x_rows.view(-1, in_features), out.view(-1, out_features)
    for adapter, rows in segments.spans:
        lora_A, lora_B = factors[adapter]
        if isinstance(rows, slice):  # this adapter's tokens are one slice of x and of out
            tokens = slice(rows.start * tokens_per_row, rows.stop * tokens_per_row)
            hidden = torch.mm(
                x_tokens[tokens] if x.dtype == dtype else x_tokens[tokens].to(dtype), lora_A.t()
            )
            if out.dtype == dtype:
                out_tokens[tokens].addmm_(hidden, lora_B.t(), alpha=scales[adapter])
            else:
                out_tokens[tokens].add_(torch.mm(hidden, lora_B.t()), alpha=scales[adapter])
            continue
        gathered = x_rows.index_select(0, rows).view(-1, in_features)
        hidden = torch.mm(gathered if x.dtype == dtype else gathered.to(dtype), lora_A.t())
        delta = torch.mm(hidden, lora_B.t()).view(-1, tokens_per_row * out_features)
        if out.dtype == dtype:
            out_rows.index_add_(0, rows, delta, alpha=scales[adapter])
        else:  # index_add_ takes one dtype; this rounds the sum once, as the contract says
            out_rows.index_copy_(0, rows, out_rows.index_select(0, rows).add_(delta, alpha=scales[adapter]))
    return out


def _segmented_delta(x_rows, segments, factors, scales, x_shape, out_features, dtype) -> torch.Tensor:
    """``segmented_lora`` without ``out``: out of place, so that autograd sees every op."""
    in_features = x_shape[-1]
    parts, indices = [], []
    for adapter, rows in segments.spans:
        lora_A, lora_B = factors[adapter]
        if isinstance(rows, slice):
            tokens, rows = x_rows[rows], torch.arange(rows.start, rows.stop)
        else:
            tokens = x_rows.index_select(0, rows)
        hidden = torch.mm(tokens.reshape(-1, in_features).to(dtype), lora_A.t()) * scales[adapter]
        parts.append(torch.mm(hidden, lora_B.t()).view(rows.numel(), -1))
        indices.append(rows)
    delta = torch.cat(parts)
    zeros = delta.new_zeros(x_rows.shape[0], delta.shape[1])
    return zeros.index_add(0, torch.cat(indices), delta).view(*x_shape[:-1], out_features)
