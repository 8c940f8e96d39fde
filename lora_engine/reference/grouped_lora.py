"""PyTorch mixed-adapter batch, two ways with the same result (tested against each other):

- on the CPU, rows segmented by adapter (``row_segments``, ``segmented_lora``): the routing is read on the host
  once per forward (``tolist()``, free for a CPU tensor) into one span of rows per adapter present. Where each
  adapter's rows already sit together in the batch (one adapter, one row per adapter, rows sent in adapter
  order) the spans are slices of ``x`` and of the output, and each adapter adds its term in place by one ``mm``
  and one ``addmm_``: no copy of anything. Otherwise the routed rows are gathered once in adapter order, each
  span runs the same two matmuls into one buffer, and one ``index_add_`` puts the rows back. The work is the
  peft loop's (each token meets one adapter), the factors are read where they are stored (no stacking, no
  padding to the largest rank), and base-only rows do nothing;
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
    """The batch rows of a routing, one span per adapter that some row runs, in adapter order.

    ``spans``: ``(adapter, start, stop)``. ``rows``: ``None`` when every adapter's rows are consecutive in the
    batch; the spans then index the batch itself. Otherwise ``rows`` (int64 ``[R]``) lists the routed rows in
    adapter order and the spans index ``rows``. Rows running no adapter are in no span.
    """

    spans: tuple[tuple[int, int, int], ...]
    rows: torch.Tensor | None

    @property
    def adapters(self) -> list[int]:
        return [adapter for adapter, _, _ in self.spans]


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
    used = sorted(rows_of)
    if all(rows_of[a][-1] - rows_of[a][0] == len(rows_of[a]) - 1 for a in used):
        return RowSegments(tuple((a, rows_of[a][0], rows_of[a][-1] + 1) for a in used), None)
    spans, start = [], 0
    for adapter in used:
        spans.append((adapter, start, start + len(rows_of[adapter])))
        start += len(rows_of[adapter])
    return RowSegments(
        tuple(spans), torch.tensor([row for a in used for row in rows_of[a]], dtype=torch.long)
    )


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
    delta).to(out.dtype)``; rows in no span are not touched; returns ``out``.
    """
    batch, in_features = x.shape[0], x.shape[-1]
    tokens_per_row = math.prod(x.shape[1:-1])
    first_B = factors[segments.spans[0][0]][1] if segments.spans else None
    out_features = first_B.shape[0] if first_B is not None else None
    if out is None:
        return _segmented_delta(
            x, segments, factors, scales, batch, tokens_per_row, in_features, out_features
        )
    if not segments.spans:
        return out
    dtype = first_B.dtype
    convert = x.dtype != dtype
    if segments.rows is None:  # every adapter's rows are one slice of x and of out: add in place, no copies
        flat_x = x.reshape(batch * tokens_per_row, in_features)
        flat_out = out.view(batch * tokens_per_row, out_features)
        for adapter, start, stop in segments.spans:
            lora_A, lora_B = factors[adapter]
            tokens = slice(start * tokens_per_row, stop * tokens_per_row)
            rows = flat_x[tokens].to(dtype) if convert else flat_x[tokens]
            hidden = torch.mm(rows, lora_A.t())
            if out.dtype == dtype:
                flat_out[tokens].addmm_(hidden, lora_B.t(), alpha=scales[adapter])
            else:
                flat_out[tokens].add_(torch.mm(hidden, lora_B.t()).mul_(scales[adapter]))
        return out
    # Rows gathered and put back as [B, T·features] rows: index_add_ over a 3-d [B, T, out] view takes a
    # scatter path that measured ~4x slower than over the same memory seen as 2-d rows.
    gathered = x.reshape(batch, tokens_per_row * in_features).index_select(0, segments.rows)
    flat_gathered = gathered.view(-1, in_features)
    delta = torch.empty(flat_gathered.shape[0], out_features, dtype=dtype)
    for adapter, start, stop in segments.spans:
        lora_A, lora_B = factors[adapter]
        tokens = slice(start * tokens_per_row, stop * tokens_per_row)
        rows = flat_gathered[tokens].to(dtype) if convert else flat_gathered[tokens]
        # beta=0: the buffer's uninitialised contents are ignored, not added
        torch.addmm(
            delta[tokens],
            torch.mm(rows, lora_A.t()),
            lora_B.t(),
            beta=0,
            alpha=scales[adapter],
            out=delta[tokens],
        )
    rows_out = out.view(batch, tokens_per_row * out_features)
    delta = delta.view(-1, tokens_per_row * out_features)
    if out.dtype == dtype:
        rows_out.index_add_(0, segments.rows, delta)
    else:
        rows_out.index_copy_(0, segments.rows, rows_out.index_select(0, segments.rows).add_(delta))
    return out


def _segmented_delta(x, segments, factors, scales, batch, tokens_per_row, in_features, out_features):
    """``segmented_lora`` without ``out``: out of place, so that autograd sees every op."""
    if not segments.spans:
        raise ValueError("segmented_lora: no row runs an adapter; pass out= or skip the call")
    dtype = factors[segments.spans[0][0]][1].dtype
    rows = x.reshape(batch, tokens_per_row, in_features)
    if segments.rows is not None:
        rows = rows.index_select(0, segments.rows)
    parts = []
    for adapter, start, stop in segments.spans:
        lora_A, lora_B = factors[adapter]
        hidden = torch.mm(rows[start:stop].reshape(-1, in_features).to(dtype), lora_A.t())
        parts.append(torch.mm(hidden * scales[adapter], lora_B.t()))
    index = segments.rows
    if index is None:
        index = torch.cat([torch.arange(start, stop) for _, start, stop in segments.spans])
    delta = torch.cat(parts).view(-1, tokens_per_row, out_features)
    zeros = torch.zeros(batch, tokens_per_row, out_features, dtype=dtype)
    return zeros.index_add(0, index, delta).view(*x.shape[:-1], out_features)
