"""Mixed-adapter batches in Triton (SGMV-style): shrink ``h = x A_iᵀ`` and expand ``out += s_i · h B_iᵀ``.

The tokens are grouped by adapter once per forward (``segments``, computed with a few torch ops on the device, no
host sync): the token indices in adapter order, and a tile map that cuts each adapter's tokens into tiles of
``BLOCK_M`` rows. One program per tile (times the output-column tiles for the expand): it reads its adapter's
factors once for all its rows, so a batch whose rows share an adapter runs as one GEMM per adapter, and a batch of
``n`` adapters costs what one adapter costs plus at most ``n`` partial tiles. The grid is sized on the host by an
upper bound (``ceil(T / BLOCK_M) + n`` tiles); tiles past the real count, and base-only tokens (which are in no
tile), do no work.

Deterministic: every element of ``h`` and of the output is written by exactly one program, with a fixed
summation order (no atomics). The shrink keeps the whole reduction over ``in`` in one program; at decode sizes
(few tokens, ``in`` = 4096) that leaves few programs, and a split-K with partials would add parallelism (not done).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETED, cast, dot_acc, fp32_dot_precision, on_device, rank_block

__all__ = ["Segments", "adapter_segments", "grouped_lora_"]

# Tokens per tile: 64 on a GPU, the smallest a Hopper warpgroup MMA (wgmma) takes; at decode sizes most rows of a
# tile are masked, which costs no memory traffic (the factors' reads dominate). 16 under the interpreter, so that
# small tests already cut an adapter's tokens into several tiles.
BLOCK_M = 16 if INTERPRETED else 64
BLOCK_K, BLOCK_N, NUM_WARPS = (16, 16, 1) if INTERPRETED else (128, 128, 4)


class Segments:
    """Tokens grouped by adapter: ``order [T]`` (token indices, stably sorted by adapter, base-only tokens first)
    and per tile ``tile_adapter``, ``tile_start``, ``tile_end`` (``[tiles]`` int32; positions in ``order``;
    ``tile_adapter`` -1 for a tile with nothing to do). ``tiles`` is the host-side upper bound the grids use."""

    def __init__(self, order, tile_adapter, tile_start, tile_end, tiles: int) -> None:
        self.order, self.tile_adapter, self.tile_start, self.tile_end = (
            order,
            tile_adapter,
            tile_start,
            tile_end,
        )
        self.tiles = tiles


def adapter_segments(row_adapter: torch.Tensor, tokens_per_row: int, adapters: int) -> Segments:
    """Segment the ``[B]`` routing (index into ``adapters`` stacked adapters, or -1) of a batch whose rows hold
    ``tokens_per_row`` tokens each. Torch ops on ``row_adapter``'s device only; no value is read on the host."""
    device = row_adapter.device
    token_adapter = row_adapter.repeat_interleave(tokens_per_row)  # [T]
    tokens = token_adapter.numel()
    order = torch.argsort(token_adapter, stable=True).to(torch.int32)
    # Counts by scatter-add (bincount would read its maximum on the host). Slot 0 is the base-only tokens.
    counts = torch.zeros(adapters + 1, dtype=torch.long, device=device)
    counts.index_add_(0, token_adapter + 1, torch.ones_like(token_adapter))
    starts = torch.cumsum(counts, 0) - counts  # [n + 1] position of each group in `order`
    tile_counts = (counts[1:] + BLOCK_M - 1) // BLOCK_M  # [n]
    tile_ends = torch.cumsum(tile_counts, 0)  # [n] first tile after each adapter's
    tiles = triton.cdiv(tokens, BLOCK_M) + adapters
    tile = torch.arange(tiles, device=device)
    adapter = torch.searchsorted(tile_ends, tile, right=True)  # [tiles], == adapters past the last real tile
    real = adapter < adapters
    adapter = adapter.clamp(max=adapters - 1)
    first_tile = tile_ends[adapter] - tile_counts[adapter]
    tile_start = starts[adapter + 1] + (tile - first_tile) * BLOCK_M
    tile_end = torch.minimum(tile_start + BLOCK_M, starts[adapter + 1] + counts[adapter + 1])
    tile_adapter = torch.where(real, adapter, -1)
    return Segments(
        order, tile_adapter.to(torch.int32), tile_start.to(torch.int32), tile_end.to(torch.int32), tiles
    )


@triton.jit
def _tile_tokens(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M: tl.constexpr):
    """(adapter, token indices [BLOCK_M] int64, their mask) of this program's tile."""
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    positions = start + tl.arange(0, BLOCK_M)
    valid = positions < end
    tokens = tl.load(order_ptr + positions, mask=valid, other=0).to(tl.int64)
    return adapter, tokens, valid


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    lora_A_ptr,  # [n, R, K]
    h_ptr,  # [T, R] fp32
    order_ptr,
    tile_adapter_ptr,
    tile_start_ptr,
    tile_end_ptr,
    K,
    R,
    stride_x_t,
    stride_x_k,
    stride_a_n,
    stride_a_r,
    stride_a_k,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``h[t, r-block] = x[t] A_iᵀ`` for the tokens of one tile (adapter i) and one rank block."""
    adapter, tokens, valid = _tile_tokens(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if adapter < 0:
        return
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a_base = lora_A_ptr + adapter.to(tl.int64) * stride_a_n
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x_t + (k_start + ks)[None, :] * stride_x_k,
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        lora_A = tl.load(
            a_base + rs[None, :] * stride_a_r + (k_start + ks)[:, None] * stride_a_k,
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        acc = dot_acc(x.to(lora_A.dtype), lora_A, acc, FP32_PRECISION)
    # Rounded to the adapters' dtype, as the reference's first matmul returns it.
    acc = cast(acc, lora_A_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + tokens[:, None] * R + rs[None, :], acc, mask=valid[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    h_ptr,  # [T, R] fp32
    lora_B_ptr,  # [n, N, R]
    scaling_ptr,  # [n] fp32
    out_ptr,  # [T, N], read, added to and written
    order_ptr,
    tile_adapter_ptr,
    tile_start_ptr,
    tile_end_ptr,
    N,
    R,
    stride_b_n_adapter,
    stride_b_n,
    stride_b_r,
    stride_out_t,
    stride_out_n,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``out[t, n-block] += h[t] (s_i · B_i)ᵀ`` rounded to the adapters' dtype, for one tile and column block."""
    adapter, tokens, valid = _tile_tokens(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    if adapter < 0:
        return
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    rs = tl.arange(0, BLOCK_R)
    b_base = lora_B_ptr + adapter.to(tl.int64) * stride_b_n_adapter
    scale = tl.load(scaling_ptr + adapter)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r_start in range(0, R, BLOCK_R):
        r_ok = rs < R - r_start
        h = tl.load(
            h_ptr + tokens[:, None] * R + (r_start + rs)[None, :],
            mask=valid[:, None] & r_ok[None, :],
            other=0.0,
        )
        lora_B = tl.load(
            b_base + ns[None, :] * stride_b_n + (r_start + rs)[:, None] * stride_b_r,
            mask=n_ok[None, :] & r_ok[:, None],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        # The scaling folded into B and rounded to its dtype, as the reference does.
        lora_B = cast(lora_B.to(tl.float32) * scale, lora_B.dtype)
        acc = dot_acc(h.to(lora_B.dtype), lora_B, acc, FP32_PRECISION)
    delta = cast(acc, lora_B_ptr.dtype.element_ty).to(tl.float32)
    out_ptrs = out_ptr + tokens[:, None] * stride_out_t + ns[None, :] * stride_out_n
    tile_ok = valid[:, None] & n_ok[None, :]
    base = tl.load(out_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, cast(base + delta, out_ptr.dtype.element_ty), mask=tile_ok)


@torch.no_grad()
def grouped_lora_(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    segments: Segments,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[t] += s_i · (x[t] A_iᵀ) B_iᵀ`` for every token ``t`` whose adapter ``i`` is not -1, in place.

    ``x [T, in]`` and ``out [T, out]`` (any strides, any float dtypes), ``lora_A [n, r, in]``,
    ``lora_B [n, out, r]`` (one dtype), ``scaling [n]`` fp32, ``segments`` from ``adapter_segments`` for these
    ``T`` tokens; the op checks the operands. Scaled and rounded as the reference: ``h`` and the delta are rounded
    to the adapters' dtype, the sum to ``out``'s. Returns ``out``.
    """
    tokens, in_features = x.shape
    adapters, rank, _ = lora_A.shape
    out_features = lora_B.shape[1]
    if tokens == 0 or rank == 0 or out_features == 0:
        return out
    h = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    block_r = rank_block(rank)
    tiles = (segments.order, segments.tile_adapter, segments.tile_start, segments.tile_end)
    precision = fp32_dot_precision()
    with on_device(x):
        _shrink_kernel[(segments.tiles, triton.cdiv(rank, block_r))](
            x, lora_A, h, *tiles, in_features, rank, *x.stride(), *lora_A.stride(),
            FP32_PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=block_r, num_warps=NUM_WARPS,
        )  # fmt: skip
        _expand_kernel[(segments.tiles, triton.cdiv(out_features, BLOCK_N))](
            h, lora_B, scaling, out, *tiles, out_features, rank, *lora_B.stride(), *out.stride(),
            FP32_PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r, num_warps=NUM_WARPS,
        )  # fmt: skip
    torch.autograd.graph.increment_version(out)
    return out
