"""PyTorch mixed-adapter batch, two ways with the same result (tested against each other):

- on the CPU, rows grouped by adapter: the batch rows are read on the host (``row_adapter.tolist()``, free for a
  CPU tensor) into one equal-sized block of rows per adapter present (short blocks padded with a repeat of one
  of their rows, given zero weight); the blocks, in at most four groups (``row_groups``), are gathered, run their
  own adapters by two ``bmm`` and are added into the output rows by ``index_add_``. The work is the peft loop's
  (each token meets one adapter), in a bounded number of ops whatever the number of adapters, with no per-row
  copy of the factors and transients of a quarter of the batch;
- elsewhere, with no host sync: each row's factors gathered, then two batched matmuls."""

from __future__ import annotations

import math

import torch

_GROUPS = 4  # the CPU path adds the adapters' rows in this many groups at most; see row_groups


def grouped_lora(
    x: torch.Tensor,
    row_adapter: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor | None = None,
    groups: list | None = None,
) -> torch.Tensor:
    """``ops.grouped_lora`` in PyTorch; see its docstring for the contract.

    ``out`` (CPU only, contiguous ``[B, ..., out]`` in the adapters' dtype, no autograd): ``out += delta`` in
    place, returned. Without it, returns ``delta`` in the adapters' dtype. ``groups``: ``row_groups(row_adapter,
    n)``, computed once per forward by the caller, else here (CPU only).
    """
    if x.device.type == "cpu":
        return _grouped_by_adapter(x, row_adapter, lora_A, lora_B, scaling, out, groups)
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


def row_groups(row_adapter: torch.Tensor, adapters: int) -> list[tuple[list[int], torch.Tensor, list[int]]]:
    """The CPU path's plan for a ``[B]`` routing into ``adapters`` stacked adapters, the same for every layer
    that holds them (compute it once per forward): groups of ``(used, index, counts)``: adapters that some row
    runs, the batch rows of their blocks (``[len(used) · width]`` int64, each block padded to ``width`` rows by
    repeating its first row) and how many rows of each block are real. Rows running -1 are in none.

    A few groups, not one: a group's gathered rows and products are transients the size of its share of x and
    of the output, so a quarter of the batch at a time keeps the peak below the peft loop's (which holds one
    adapter's rows at a time), at a handful of ops per group. Raises ``IndexError`` for an adapter ``>= adapters``.
    """
    rows_of: dict[int, list[int]] = {}
    for row, adapter in enumerate(row_adapter.tolist()):
        if adapter >= adapters:
            raise IndexError(f"grouped_lora: row {row} runs adapter {adapter}; only {adapters} are stacked")
        if adapter >= 0:
            rows_of.setdefault(adapter, []).append(row)
    used = sorted(rows_of)
    width = max((len(rows) for rows in rows_of.values()), default=0)
    per_group = -(-len(used) // _GROUPS) if used else 1
    groups = []
    for first in range(0, len(used), per_group):
        members = used[first : first + per_group]
        index = [row for a in members for row in rows_of[a] + rows_of[a][:1] * (width - len(rows_of[a]))]
        groups.append((members, torch.tensor(index, dtype=torch.long), [len(rows_of[a]) for a in members]))
    return groups


def _grouped_by_adapter(x, row_adapter, lora_A, lora_B, scaling, out, groups) -> torch.Tensor:
    batch, in_features = x.shape[0], x.shape[-1]
    tokens_per_row = math.prod(x.shape[1:-1])
    out_features = lora_B.shape[1]
    target = out if out is not None else x.new_zeros((*x.shape[:-1], out_features), dtype=lora_A.dtype)
    rows = x.reshape(batch, tokens_per_row, in_features)
    sums = target.view(batch, tokens_per_row, out_features)
    scales = scaling.tolist()
    for used, index, counts in groups if groups is not None else row_groups(row_adapter, lora_A.shape[0]):
        _add_blocks_(sums, rows, used, index, counts, lora_A, lora_B, scales)
    return target


def _add_blocks_(sums, rows, used, index, counts, lora_A, lora_B, scales) -> None:
    """``sums[row] += s · (rows[row] Aᵀ) Bᵀ`` for every real row of the blocks (one per adapter of ``used``)."""
    width, tokens_per_row, in_features = index.numel() // len(used), rows.shape[1], rows.shape[2]
    # Each slot's scale: its adapter's, or 0 for a padding repeat (whose product then adds exact zeros).
    weights = torch.tensor(
        [[scales[a] if slot < count else 0.0 for slot in range(width)] for a, count in zip(used, counts)],
        dtype=lora_A.dtype,
    )
    gathered = rows.index_select(0, index).to(lora_A.dtype)
    if used[-1] - used[0] == len(used) - 1:  # consecutive adapters (the usual case): views, not copies
        factors_A, factors_B = lora_A[used[0] : used[-1] + 1], lora_B[used[0] : used[-1] + 1]
    else:
        factors_A, factors_B = lora_A[used], lora_B[used]
    hidden = torch.bmm(
        gathered.view(len(used), width * tokens_per_row, in_features), factors_A.transpose(1, 2)
    )
    hidden = hidden.view(len(used), width, tokens_per_row, -1) * weights[:, :, None, None]
    delta = torch.bmm(hidden.view(len(used), width * tokens_per_row, -1), factors_B.transpose(1, 2))
    sums.index_add_(0, index, delta.view(len(used) * width, tokens_per_row, -1))
