"""bitsandbytes' PyTorch 4-bit quantizer (the one its CPU backend runs for ``quantize_4bit``), bit for bit, about
ten times faster on the CPU: what a 4-bit merge (``layers.bnb``'s requantization) spent most of its time in.

bnb's recipe, which this follows step for step (same fp32 operations, same order): flatten; per block of
``blocksize`` elements ``absmax = max |w|``; ``scaled = clamp(w · (1 / max(absmax, 1e-38)), -1, 1)`` (the partial
last block divides by its clamped absmax instead, and its absmax is stored clamped); pad to an even count with 0.0;
the index of a value is the number of midpoints between consecutive sorted codes that lie strictly below it
(``torch.bucketize``), mapped back to code order (FP4's codes are not sorted); two indices per byte, high nibble
first.

Where the time goes: ``torch.bucketize`` is a binary search per element (~35 ns each on the CPU). Here the
index is found with a lookup on a uniform grid of ``GRID`` cells over ``[-1, 1]``: the count of midpoints below a
cell's lower edge, plus one exact comparison with the one midpoint inside the cell, if any. The grid is chosen so
that a cell holds at most one midpoint and no midpoint sits just below a cell edge, where an element computed
into the next cell up (``(x + 1) · GRID / 2`` rounds to nearest, so an element can only move up, onto an edge)
would miss it; both are asserted when the tables are built. NaN (from a non-finite weight) gets bnb's index,
that of a value above every midpoint.
"""

from __future__ import annotations

import functools
from math import prod

import torch

from lora_engine.ops.nf4_dequantize import code_on

#: Cells of the lookup grid over [-1, 1]: FP4 has midpoints at 0 and 1/384 (its two zero codes and 1/192), a
#: cell is 1/512 wide.
GRID = 1024
#: No midpoint may lie this close below a cell edge: ``x + 1`` is rounded by at most 2**-24 in fp32.
_EDGE_MARGIN = 1e-6
#: Elements quantized per chunk (even, so that a chunk packs into whole bytes).
_CHUNK = 1 << 16


@functools.cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index_below [GRID + 1, 2] uint8, midpoint_inside [GRID] fp32)``: the code index of an element of cell
    ``c`` is ``index_below[c, x > midpoint_inside[c]]`` (already mapped to code order); ``+inf`` where a cell holds
    no midpoint. Row ``GRID`` is NaN's: bnb's index for it, whatever the comparison says."""
    code = code_on(quant_type, torch.device("cpu"))
    order = torch.argsort(code)  # as bnb orders them (equal codes, FP4's two zeros, keep its order)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # fp32, as bnb computes them
    edges = torch.arange(GRID + 1, dtype=torch.float64) / (GRID / 2) - 1
    index_below = torch.empty(GRID + 1, 2, dtype=torch.uint8)
    midpoint_inside = torch.full((GRID,), float("inf"))
    for cell in range(GRID):
        low, high = edges[cell], edges[cell + 1]
        inside = midpoints[(midpoints.double() >= low) & (midpoints.double() < high)]
        assert inside.numel() <= 1, f"{quant_type}: cell {cell} of the quantization grid holds two midpoints"
        assert not ((midpoints.double() > high - _EDGE_MARGIN) & (midpoints.double() < high)).any()
        below = int((midpoints.double() < low).sum())
        index_below[cell] = order[[below, below + 1]] if inside.numel() else order[[below, below]]
        if inside.numel():
            midpoint_inside[cell] = inside[0]
    index_below[GRID] = order[len(midpoints)]
    return index_below, midpoint_inside


def _code_indices(scaled: torch.Tensor, quant_type: str, may_hold_nan: bool) -> torch.Tensor:
    """uint8 code index of every element of ``scaled`` (fp32 in ``[-1, 1]`` or NaN), as bnb's bucketize gives.
    ``index_select`` with int64 indices: torch's advanced indexing is 4x slower on the CPU."""
    index_below, midpoint_inside = _tables(quant_type)
    cell = (scaled + 1).mul_(GRID / 2).to(torch.int64).clamp_(0, GRID - 1)
    above = torch.gt(scaled, midpoint_inside.index_select(0, cell))
    row_and_column = cell.mul_(2).add_(above)
    if may_hold_nan:
        row_and_column.masked_fill_(scaled.isnan(), 2 * GRID)
    return index_below.view(-1).index_select(0, row_and_column)


def quantize_4bit(weight: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed [ceil(numel / 2)] uint8, absmax [blocks] fp32)`` of ``weight`` (on the CPU, any shape; fp32, fp16
    or bf16, quantized from its fp32 values), bit for bit what ``torch.ops.bitsandbytes.quantize_4bit`` returns with its
    PyTorch kernel (flattened). Nothing is mutated."""
    flat = weight.reshape(-1).float()
    numel = prod(weight.shape)
    full = numel - numel % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1))
    parts = [scaled.clamp_(-1, 1).view(-1)]
    if full < numel:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        parts.append(torch.clamp(flat[full:] / tail_absmax, -1, 1))
    if numel % 2:
        parts.append(scaled.new_zeros(1))
    scaled = torch.cat(parts) if len(parts) > 1 else parts[0]
    may_hold_nan = not bool(absmax.isfinite().all())
    packed = torch.empty(scaled.numel() // 2, dtype=torch.uint8)
    # In chunks: the int64 temporaries of a whole weight (8 bytes per element) would stream through memory
    # several times; a chunk's stay in the core's L2 (measured 3x faster at 1024 x 256).
    for start in range(0, scaled.numel(), _CHUNK):
        indices = _code_indices(scaled[start : start + _CHUNK], quant_type, may_hold_nan)
        chunk_bytes = packed[start // 2 : (start + _CHUNK) // 2]
        torch.bitwise_or(indices[0::2] << 4, indices[1::2], out=chunk_bytes)
    return packed, absmax
