"""Fused LoRA linear in Triton: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` and its backward (W frozen).

Shapes: ``x [..., in]`` (any leading dims and strides), ``W [out, in]`` (``[in, out]`` with
``fan_in_fan_out``, handled by strides), ``A [r, in]``, ``B [out, r]``; ``N`` is the number of rows of ``x``.

**Why this fusion.** The base GEMM ``x Wᵀ`` costs ``2·N·in·out`` FLOPs; everything low-rank is ``O(N·(in+out)·r)``
and therefore memory-bound: what it costs is passes over ``N × in`` and ``N × out`` tensors (each ≈6% of the base
GEMM on an H100 at d = 4096, N = 8192; ``../shared/research/performance.md`` §6). So:

- forward, two launches. ``_project_kernel`` computes the small product ``xa = drop(x) Aᵀ [N, r]`` in one pass over
  x (dropout applied on the fly, never stored). ``_fused_linear_kernel`` is the base GEMM that also owns the
  expand: each output tile first gets ``s · xa Bᵀ`` (a rank-r dot) in its fp32 accumulator, then the K loop adds
  ``x Wᵀ``, then the bias; the output is written once and no ``[N, out]`` delta exists. (The rank-r term goes in
  first, not in the epilogue, so that the tile needs one accumulator, not two: two spill registers on an H100.)
  Computing ``xa`` inside the GEMM instead would redo it, Philox draws included, once per output-column tile
  (``out / BLOCK_M`` times): more work than the one extra read of x it saves.
- backward, four launches, each a single pass over its big operand: ``dxa = s · dy B [N, r]``
  (``_project_kernel`` over dy); ``dB = s · dyᵀ xa`` and ``dA = dxaᵀ drop(x)`` (``_outer_kernel``: reductions
  over rows, split over row ranges into small fp32 partials that torch sums in a fixed order, so results are
  deterministic); and ``dx = dy W + mask ⊙ (dxa A) / (1 - p)``, the same fused GEMM with the mask regenerated on
  its output tile. Fusing ``dB`` or ``dA`` into the row-tiled kernels would save one pass over dy but needs
  cross-program atomic adds (non-deterministic fp32 sums); not taken.

Saved for backward: x as it came (no copy unless its leading dims cannot be flattened as a view, and then only
transiently), the ``[N, r]`` product and the dropout seed; the Philox mask (``tl.rand(seed, flat index)``) is
regenerated in backward, and ``dropout_keep_mask`` materialises it for tests.

Dtypes: x and W fp32, fp16 or bf16 (the same); adapters fp32 (peft's default on half-precision bases) or the
input's dtype. The base GEMM runs on x's dtype; the low-rank path on the adapters' dtype (x and dy are cast to
it); all with fp32 accumulators. Dots on fp32 operands follow ``torch.get_float32_matmul_precision()``
(``_utils.fp32_dot_precision``), except that an fp32 rank-r term landing in a 16-bit output uses TF32. Under
``torch.autocast`` all operands are cast to the autocast dtype first, as autocast does to the reference's
``F.linear`` calls.

Tiles: autotuned on CUDA over the configs listed with each kernel, pruned per call to those that compile for
sm_90a without register spills (``tests/kernel_ops/test_kernels_compile_for_h100.py`` checks this offline); under
the interpreter one small fixed tile. GPU performance is unmeasured.

Gradients: x, A and B by these kernels; if W or the bias require grad (not the LoRA case), ``dyᵀ x`` and
``Σ dy`` are computed with torch (a plain cuBLAS GEMM and a reduction: nothing low-rank to fuse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    autotune_configs,
    cast,
    dot_acc,
    dropout_keep,
    fp32_dot_precision,
    on_device,
    rank_block,
    row_splits,
)

__all__ = ["LoraLinearFunction", "dropout_keep_mask", "lora_linear"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------- kernels
def _gemm_configs() -> list[triton.Config]:
    def config(block_n, block_m, block_k, stages, warps):
        return triton.Config(
            {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": block_k, "GROUP_N": 8},
            num_stages=stages,
            num_warps=warps,
        )

    return autotune_configs(
        [
            config(128, 256, 64, 3, 8),
            config(256, 128, 64, 3, 8),
            config(128, 128, 64, 4, 4),
            config(128, 128, 32, 4, 4),
            config(64, 256, 32, 4, 4),
            config(128, 64, 32, 4, 4),
            config(64, 128, 32, 4, 4),
            config(128, 64, 64, 4, 8),
            config(64, 128, 64, 4, 8),
            config(64, 64, 64, 4, 4),
        ],
        interpreter_config=config(16, 16, 16, 1, 1),
    )


SHARED_MEMORY_BUDGET = 200 * 1024  # of an H100's 227 KiB per block, leaving room for layout conversions


def _prune_gemm_configs(configs, named_args, **constexprs):
    """Drop the tiles that spill registers or overflow shared memory for this call, as measured by compiling the
    kernel for sm_90a: a tile's fp32 accumulator may hold at most 32 values per thread when it also draws the
    dropout mask (ten unrolled Philox rounds per value), 64 with three-pass TF32 dots, 128 otherwise."""
    lhs, hidden = named_args["lhs_ptr"], named_args["hidden_ptr"]
    three_pass = (
        constexprs["HAS_BASE"] and lhs.dtype == torch.float32 and constexprs["FP32_PRECISION"] == "tf32x3"
    ) or (hidden.dtype == torch.float32 and constexprs["LOW_RANK_PRECISION"] == "tf32x3")
    per_thread = 32 if constexprs["HAS_DROPOUT"] else 64 if three_pass else 128
    element_size = lhs.element_size() if constexprs["HAS_BASE"] else 0

    def fits(config):
        tile = config.kwargs
        values = tile["BLOCK_N"] * tile["BLOCK_M"] // (32 * config.num_warps)
        staged = config.num_stages * (tile["BLOCK_N"] + tile["BLOCK_M"]) * tile["BLOCK_K"] * element_size
        return values <= per_thread and staged <= SHARED_MEMORY_BUDGET

    return [config for config in configs if fits(config)] or configs[-1:]


@triton.autotune(
    configs=_gemm_configs(),
    key=["M", "K", "R", "ROWS_BUCKET", "HAS_BASE", "HAS_BIAS", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.jit(do_not_specialize=["seed"])
def _fused_linear_kernel(
    lhs_ptr,  # [N, K]
    rhs_ptr,  # [K, M]
    bias_ptr,  # [M]
    hidden_ptr,  # [N, R]
    factor_ptr,  # [R, M]
    out_ptr,  # [N, M]
    N,
    M,
    K,
    R,
    stride_lhs_n,
    stride_lhs_k,
    stride_rhs_k,
    stride_rhs_m,
    stride_hidden_n,
    stride_hidden_r,
    stride_factor_r,
    stride_factor_m,
    stride_out_n,
    stride_out_m,
    scale,
    seed,
    dropout_p,
    ROWS_BUCKET,  # next_power_of_2(N): an autotune key that does not retune for every batch size
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    LOW_RANK_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """``out = lhs @ rhs + bias + scale · keep ⊙ (hidden @ factor)``, one ``[BLOCK_N, BLOCK_M]`` tile per program.

    Forward: ``lhs = x``, ``rhs = Wᵀ``, ``hidden = xa``, ``factor = Bᵀ``, ``scale = s``, no mask.
    Backward for x: ``lhs = dy``, ``rhs = W``, ``hidden = dxa``, ``factor = A``, ``scale = 1/(1-p)``, the mask.
    """
    # Grouped program order: GROUP_N row tiles sweep the column tiles together, so the rhs tiles they share
    # are reused from L2 instead of reloaded from HBM.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_N * num_pid_m
    first_pid_n = (pid // num_pid_in_group) * GROUP_N
    group_size_n = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % num_pid_in_group) % group_size_n
    pid_m = (pid % num_pid_in_group) // group_size_n

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    # int64 offsets: rows × stride can pass 2**31 on large activations.
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    # The rank-r term first, into the one accumulator the GEMM then adds to: a separate [BLOCK_N, BLOCK_M]
    # accumulator for it would double the registers a tile needs and spill. The rank is walked in BLOCK_R chunks.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    rs = tl.arange(0, BLOCK_R)
    for r_start in range(0, R, BLOCK_R):
        r_ok = rs < R - r_start
        hidden = tl.load(
            hidden_ptr + rows64[:, None] * stride_hidden_n + (r_start + rs)[None, :] * stride_hidden_r,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        factor = tl.load(
            factor_ptr + (r_start + rs)[:, None] * stride_factor_r + cols64[None, :] * stride_factor_m,
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(cast(hidden, factor.dtype), factor, acc, LOW_RANK_PRECISION)
    acc = acc * scale
    if HAS_DROPOUT:
        acc = tl.where(dropout_keep(seed, rows, cols, M, dropout_p), acc, 0.0)

    if HAS_BASE:
        ks = tl.arange(0, BLOCK_K)
        lhs_ptrs = lhs_ptr + rows64[:, None] * stride_lhs_n + ks[None, :] * stride_lhs_k
        rhs_ptrs = rhs_ptr + ks[:, None] * stride_rhs_k + cols64[None, :] * stride_rhs_m
        for k_start in range(0, K, BLOCK_K):
            k_ok = ks < K - k_start
            lhs = tl.load(lhs_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            rhs = tl.load(rhs_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_acc(lhs, rhs, acc, FP32_PRECISION)
            lhs_ptrs += BLOCK_K * stride_lhs_k
            rhs_ptrs += BLOCK_K * stride_rhs_k
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows64[:, None] * stride_out_n + cols64[None, :] * stride_out_m
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _project_configs() -> list[triton.Config]:
    def config(block_n, block_k, stages, warps):
        return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_stages=stages, num_warps=warps)

    # Memory-bound: small row tiles give enough programs to fill the GPU at moderate N. Every tile holds at
    # most 32 source values per thread, which is what the Philox draws and three-pass TF32 dots fit in without
    # spilling (compiled for sm_90a).
    return autotune_configs(
        [
            config(16, 128, 4, 4),
            config(32, 128, 4, 4),
            config(64, 64, 4, 4),
            config(64, 128, 3, 8),
            config(128, 64, 3, 8),
        ],
        interpreter_config=config(16, 16, 1, 1),
    )


@triton.autotune(configs=_project_configs(), key=["K", "R", "ROWS_BUCKET", "HAS_DROPOUT"])
@triton.jit(do_not_specialize=["seed"])
def _project_kernel(
    src_ptr,  # [N, K]
    factor_ptr,  # [K, R]
    out_ptr,  # [N, R]
    N,
    K,
    R,
    stride_src_n,
    stride_src_k,
    stride_factor_k,
    stride_factor_r,
    stride_out_n,
    stride_out_r,
    scale,
    seed,
    dropout_p,
    ROWS_BUCKET,
    HAS_DROPOUT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = scale · (keep ⊙ src) @ factor`` onto the rank: ``[N, K] → [N, R]``, in the factor's dtype.

    Forward: ``src = x``, ``factor = Aᵀ``, ``scale = 1/(1-p)``, the mask (``xa``). Backward: ``src = dy``,
    ``factor = B``, ``scale = s``, no mask (``dxa``). ``src`` is cast to the factor's dtype before the dot.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rank_ok = ranks < R
    rows64 = rows.to(tl.int64)

    ks = tl.arange(0, BLOCK_K)
    src_ptrs = src_ptr + rows64[:, None] * stride_src_n + ks[None, :] * stride_src_k
    factor_ptrs = factor_ptr + ks[:, None] * stride_factor_k + ranks[None, :] * stride_factor_r
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        src = tl.load(src_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            src = tl.where(dropout_keep(seed, rows, k_start + ks, K, dropout_p), src, 0.0)
        factor = tl.load(factor_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = dot_acc(cast(src, factor.dtype), factor, acc, FP32_PRECISION)
        src_ptrs += BLOCK_K * stride_src_k
        factor_ptrs += BLOCK_K * stride_factor_k
    acc = acc * scale

    out_ptrs = out_ptr + rows64[:, None] * stride_out_n + ranks[None, :] * stride_out_r
    tl.store(out_ptrs, cast(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


def _outer_configs() -> list[triton.Config]:
    def config(block_k, block_n, stages, warps):
        return triton.Config({"BLOCK_K": block_k, "BLOCK_N": block_n}, num_stages=stages, num_warps=warps)

    # At most 32 source values per thread, as for the projection.
    return autotune_configs(
        [
            config(64, 64, 4, 4),
            config(32, 128, 4, 4),
            config(64, 128, 3, 8),
            config(128, 64, 3, 8),
            config(128, 128, 3, 16),
        ],
        interpreter_config=config(16, 16, 1, 1),
    )


@triton.autotune(configs=_outer_configs(), key=["K", "R", "ROWS_BUCKET", "HAS_DROPOUT"])
@triton.jit(do_not_specialize=["seed"])
def _outer_kernel(
    src_ptr,  # [N, K]
    hidden_ptr,  # [N, R]
    partial_ptr,  # [splits, K, R] (any strides), fp32
    N,
    K,
    R,
    rows_per_split,
    stride_src_n,
    stride_src_k,
    stride_hidden_n,
    stride_hidden_r,
    stride_partial_split,
    stride_partial_k,
    stride_partial_r,
    scale,
    seed,
    dropout_p,
    ROWS_BUCKET,
    HAS_DROPOUT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``partial[split] = scale · Σ_{rows of split} (keep ⊙ src)ᵀ @ hidden``: ``[K, R]`` per row range.

    ``dB = s · dyᵀ xa`` (``src = dy``) and ``dAᵀ = drop(x)ᵀ dxa`` (``src = x``, ``scale = 1/(1-p)``, the mask).
    The grid is ``(K tiles, R tiles, splits)``; the launcher sums the partials, in a fixed order.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    cols64 = cols.to(tl.int64)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)

    ns = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for n_start in range(row_begin, row_end, BLOCK_N):
        rows = n_start + ns
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        src = tl.load(
            src_ptr + rows64[:, None] * stride_src_n + cols64[None, :] * stride_src_k,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            src = tl.where(dropout_keep(seed, rows, cols, K, dropout_p), src, 0.0)
        hidden = tl.load(
            hidden_ptr + rows64[:, None] * stride_hidden_n + ranks[None, :] * stride_hidden_r,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(tl.trans(cast(src, hidden.dtype)), hidden, acc, FP32_PRECISION)
    acc = acc * scale

    partial_ptrs = (
        partial_ptr
        + split * stride_partial_split
        + cols[:, None] * stride_partial_k
        + ranks[None, :] * stride_partial_r
    )
    tl.store(partial_ptrs, acc, mask=col_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, N, K, seed, dropout_p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[N, K]`` (uint8, row-major) = the dropout keep-mask the kernels above draw."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, cols, K, dropout_p)
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out_ptr + offsets, keep.to(tl.uint8), mask=(rows < N)[:, None] & (cols < K)[None, :])


# ------------------------------------------------------------------------------------------------- launchers
def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` → ``[N, k]``: a view whenever the leading dims can be flattened, a copy otherwise."""
    return tensor.reshape(-1, tensor.shape[-1])


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def _project(
    src: torch.Tensor, factor: torch.Tensor, scale: float, seed: int = 0, dropout_p: float = 0.0
) -> torch.Tensor:
    """``scale · (keep ⊙ src) @ factor``: ``src [N, K]``, ``factor [K, R]`` → ``[N, R]`` in factor's dtype."""
    (n_rows, k), rank = src.shape, factor.shape[1]
    out = torch.empty(n_rows, rank, dtype=factor.dtype, device=src.device)
    if n_rows == 0:
        return out
    block_r = rank_block(rank)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(rank, block_r))

    _project_kernel[grid](
        src,
        factor,
        out,
        n_rows,
        k,
        rank,
        *src.stride(),
        *factor.stride(),
        *out.stride(),
        scale,
        seed,
        dropout_p,
        triton.next_power_of_2(n_rows),
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_PRECISION=fp32_dot_precision(),
        BLOCK_R=block_r,
    )
    return out


def _outer(
    src: torch.Tensor,
    hidden: torch.Tensor,
    scale: float,
    *,
    transposed: bool,
    seed: int = 0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``scale · (keep ⊙ src)ᵀ @ hidden``: ``src [N, K]``, ``hidden [N, R]`` → ``[K, R]`` (``[R, K]`` when
    ``transposed``), contiguous, in hidden's dtype."""
    (n_rows, k), rank = src.shape, hidden.shape[1]
    out_shape = (rank, k) if transposed else (k, rank)
    if n_rows == 0:
        return torch.zeros(out_shape, dtype=hidden.dtype, device=src.device)
    block_r = rank_block(rank)
    # Split sizing assumes 64-wide K tiles; the autotuned BLOCK_K only changes how full the GPU is.
    splits, rows_per_split = row_splits(n_rows, triton.cdiv(k, 64) * triton.cdiv(rank, block_r), src.device)
    partial = torch.empty((splits, *out_shape), dtype=torch.float32, device=src.device)
    stride_split, stride_k, stride_r = partial.stride()
    if transposed:
        stride_k, stride_r = stride_r, stride_k

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(rank, block_r), splits)

    _outer_kernel[grid](
        src,
        hidden,
        partial,
        n_rows,
        k,
        rank,
        rows_per_split,
        *src.stride(),
        *hidden.stride(),
        stride_split,
        stride_k,
        stride_r,
        scale,
        seed,
        dropout_p,
        triton.next_power_of_2(n_rows),
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_PRECISION=fp32_dot_precision(),
        BLOCK_R=block_r,
    )
    return partial.sum(0).to(hidden.dtype)


def _fused_linear(
    lhs: torch.Tensor | None,
    rhs: torch.Tensor | None,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    factor: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    seed: int = 0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``lhs @ rhs + bias + scale · keep ⊙ (hidden @ factor)`` → ``[N, M]`` in ``out_dtype``.

    ``lhs [N, K]`` and ``rhs [K, M]`` (both or neither), ``bias [M]``, ``hidden [N, R]``, ``factor [R, M]``.
    """
    n_rows, (rank, m) = hidden.shape[0], factor.shape
    out = torch.empty(n_rows, m, dtype=out_dtype, device=hidden.device)
    if n_rows == 0:
        return out
    has_base = lhs is not None
    k = lhs.shape[1] if has_base else 0
    # Unused pointer arguments still need a tensor; their strides are never read.
    lhs_strides = lhs.stride() if has_base else (0, 0)
    rhs_strides = rhs.stride() if has_base else (0, 0)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)

    _fused_linear_kernel[grid](
        lhs if has_base else out,
        rhs if has_base else out,
        bias if bias is not None else out,
        hidden,
        factor,
        out,
        n_rows,
        m,
        k,
        rank,
        *lhs_strides,
        *rhs_strides,
        *hidden.stride(),
        *factor.stride(),
        *out.stride(),
        scale,
        seed,
        dropout_p,
        triton.next_power_of_2(n_rows),
        HAS_BASE=has_base,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        FP32_PRECISION=fp32_dot_precision(),
        # An fp32 rank-r term that lands in a 16-bit output needs no more than TF32's 11 significant bits; the
        # three-pass product would only cost registers (and spill, compiled for sm_90a).
        LOW_RANK_PRECISION=fp32_dot_precision() if out_dtype == torch.float32 else "tf32",
        BLOCK_R=rank_block(rank),
    )
    return out


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask these kernels draw for an input of ``shape`` (``[..., in]``), drop probability
    ``p`` and ``seed``: the same mask forward and backward regenerate, for tests to feed the reference."""
    in_features = shape[-1]
    n_rows = int(torch.Size(shape).numel() // in_features) if in_features else 0
    keep = torch.empty(n_rows, in_features, dtype=torch.uint8, device=device)
    if keep.numel():
        block_n, block_k = 32, 128  # the mask is a function of the element index only, not of the tiling
        grid = (triton.cdiv(n_rows, block_n), triton.cdiv(in_features, block_k))
        with on_device(keep):
            _keep_mask_kernel[grid](keep, n_rows, in_features, seed, p, BLOCK_N=block_n, BLOCK_K=block_k)
    return keep.bool().reshape(shape)


# -------------------------------------------------------------------------------------------------- autograd
class LoraLinearFunction(torch.autograd.Function):
    """Autograd of the fused LoRA linear: saves x, the ``[N, r]`` product and the dropout seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
        x_rows = _as_rows(x)
        keep_scale = _keep_scale(dropout_p)
        # [N, r], in the adapters' dtype: the one intermediate backward needs besides x.
        lora_hidden = _project(x_rows, lora_A.T, keep_scale, seed, dropout_p)
        base_weight = None
        if weight is not None:
            base_weight = weight.T if fan_in_fan_out else weight  # [out, in], a view
        out = _fused_linear(
            x_rows if weight is not None else None,
            base_weight.T if weight is not None else None,
            bias,
            lora_hidden,
            lora_B.T,
            scaling,
            x.dtype if weight is not None else lora_A.dtype,
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, lora_hidden)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.fan_in_fan_out = scaling, dropout_p, seed, fan_in_fan_out
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with on_device(grad_out):
            return LoraLinearFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight, lora_A, lora_B, lora_hidden = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        x_rows, grad_rows = _as_rows(x), _as_rows(grad_out)
        keep_scale, seed, dropout_p = _keep_scale(ctx.dropout_p), ctx.seed, ctx.dropout_p
        base_weight = None
        if weight is not None:
            base_weight = weight.T if ctx.fan_in_fan_out else weight  # [out, in]
        grad_x = grad_weight = grad_bias = grad_A = grad_B = None

        grad_hidden = _project(grad_rows, lora_B, ctx.scaling) if need_x or need_A else None  # [N, r]
        if need_B:
            grad_B = _outer(grad_rows, lora_hidden, ctx.scaling, transposed=False)
        if need_A:
            grad_A = _outer(x_rows, grad_hidden, keep_scale, transposed=True, seed=seed, dropout_p=dropout_p)
        if need_x:
            grad_x = _fused_linear(
                grad_rows if weight is not None else None,
                base_weight,
                None,
                grad_hidden,
                lora_A,
                keep_scale,
                x.dtype,
                seed,
                dropout_p,
            ).reshape(x.shape)
        if need_weight:
            grad_weight = grad_rows.T.to(weight.dtype) @ x_rows.to(weight.dtype)
            if ctx.fan_in_fan_out:
                grad_weight = grad_weight.T
        if need_bias:
            grad_bias = grad_rows.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None


def _check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear kernel: x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"lora_linear kernel: lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share one of "
            f"{SUPPORTED_DTYPES}"
        )
    operands = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    devices = {name: operand.device for name, operand in operands.items() if operand is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"lora_linear kernel: operands on different devices: {devices}")
    rank, in_features = lora_A.shape
    out_features = lora_B.shape[0]
    if x.shape[-1] != in_features or lora_B.shape[1] != rank:
        raise ValueError(
            f"lora_linear kernel: x [..., {x.shape[-1]}], lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)} do not chain as [..., in] → [r, in] → [out, r]"
        )
    if weight is not None:
        expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"lora_linear kernel: weight has shape {tuple(weight.shape)}; expected {expected} "
                f"(fan_in_fan_out={fan_in_fan_out})"
            )
        if weight.dtype != x.dtype:
            raise TypeError(f"lora_linear kernel: weight has dtype {weight.dtype} but x has {x.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"lora_linear kernel: bias has shape {tuple(bias.shape)}; expected ({out_features},)"
        )


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``ops.lora_linear`` in Triton (see its contract): ``x [..., in]`` → ``[..., out]``; ``seed`` draws the
    dropout mask when ``dropout_p > 0``.

    Under ``torch.autocast`` every floating operand is first cast to the autocast dtype, as autocast does to the
    reference's ``F.linear`` calls, adapters included (differentiable casts, so fp32 parameters get fp32 grads).
    """
    if torch.is_autocast_enabled(x.device.type):
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, lora_A, lora_B = (
            operand.to(autocast_dtype) if operand is not None else None
            for operand in (x, weight, bias, lora_A, lora_B)
        )
    _check_operands(x, weight, bias, lora_A, lora_B, fan_in_fan_out)
    with on_device(x):
        return LoraLinearFunction.apply(
            x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), int(seed), fan_in_fan_out
        )
