"""Mixed-adapter batches: which adapter each batch row runs, decided once per forward for every layer."""

from __future__ import annotations

import torch

from lora_engine.ops.grouped_lora import segment_rows
from lora_engine.reference.grouped_lora import RowSegments, row_segments

BASE_ONLY = "__base__"


class AdapterRouting:
    """The adapter of each batch row: ``names[row_adapter[b]]``, or the base model alone where -1.

    Built once per forward from the user's ``adapter_names`` (one name per row, ``"__base__"`` for the base
    model); each layer maps it to the adapters it holds with ``rows_for``.
    """

    def __init__(self, adapter_names: list[str]) -> None:
        self.names: list[str] = list(dict.fromkeys(name for name in adapter_names if name != BASE_ONLY))
        position = {name: index for index, name in enumerate(self.names)}
        self._row_positions = [position.get(name, -1) for name in adapter_names]
        self.row_adapter = torch.tensor(self._row_positions, dtype=torch.long)
        self.batch_size = len(adapter_names)
        # Per forward, shared by the layers that hold the same adapters: their rows, and those grouped by adapter.
        self._rows: dict[tuple, torch.Tensor] = {}
        self._segments: dict[tuple, object] = {}
        self._held: dict[tuple, list[str]] = {}
        self._row_segments: dict[tuple, RowSegments] = {}

    def held_by(self, adapters: dict) -> list[str]:
        """The routed adapters that are keys of ``adapters`` (a layer's ``r``), in ``self.names`` order; computed
        once per forward for each set of keys."""
        key = tuple(adapters)
        if key not in self._held:
            self._held[key] = [name for name in self.names if name in adapters]
        return self._held[key]

    def row_segments_for(self, held: list[str]) -> RowSegments:
        """The batch rows segmented by adapter for ``reference.grouped_lora.segmented_lora`` (host only, CPU
        tensors), the adapters numbered by their position in ``held``; rows running an adapter not in ``held``
        are in no span. Once per forward for each ``held``."""
        key = tuple(held)
        if key not in self._row_segments:
            to_held = [held.index(name) if name in held else -1 for name in self.names]
            routing = [to_held[position] if position >= 0 else -1 for position in self._row_positions]
            self._row_segments[key] = row_segments(routing, len(held))
        return self._row_segments[key]

    def rows_for(self, held: list[str], device: torch.device) -> torch.Tensor:
        """``[B]`` indices into ``held`` (the routed adapters one layer holds, in ``self.names`` order), -1 where
        the row runs an adapter the layer does not hold or the base model. Computed once per ``held`` and device."""
        key = (tuple(held), device)
        if key not in self._rows:
            self._rows[key] = self._map_rows(held, device)
        return self._rows[key]

    def rows_by_adapter(self, held: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``(name, rows)`` for each adapter of ``held`` that some batch row runs: its rows' indices, int64 on
        ``device``, in batch order. For layers that run each adapter over its own rows."""
        row_adapter = self.rows_for(held, device)
        by_adapter = [(name, (row_adapter == index).nonzero().squeeze(1)) for index, name in enumerate(held)]
        return [(name, rows) for name, rows in by_adapter if rows.numel()]

    def segments_for(self, rows: torch.Tensor, tokens_per_row: int, adapters: int):
        """``rows`` (from ``rows_for``) grouped by adapter for ``grouped_lora`` (``segment_rows``), once per
        forward."""
        key = (id(rows), tokens_per_row)  # `rows` is held in self._rows for as long as this routing lives
        if key not in self._segments:
            self._segments[key] = segment_rows(rows, tokens_per_row, adapters)
        return self._segments[key]

    def _map_rows(self, held: list[str], device: torch.device) -> torch.Tensor:
        to_held = torch.full((len(self.names) + 1,), -1, dtype=torch.long)  # the last slot maps -1 to -1
        for held_index, name in enumerate(held):
            to_held[self.names.index(name)] = held_index
        return to_held[self.row_adapter].to(device)

    def check_batch(self, batch_size: int, module_name: str) -> None:
        if batch_size != self.batch_size:
            raise ValueError(
                f"adapter_names has {self.batch_size} entries but {module_name} got a batch of {batch_size} "
                "rows; pass one adapter name per row"
            )
