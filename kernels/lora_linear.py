"""Fused LoRA linear in Triton: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` and its backward (W frozen).

This module is the Triton backend's math for ``ops.lora_linear``: ``forward`` and ``backward``, each a short
sequence of launches of the kernels in ``fused_linear`` (the GEMM), ``low_rank`` and ``grad_out_pass`` (the
rank-r passes). Two strategies run the base GEMMs (``strategy``: chosen per shape by timing on CUDA, or
forced): ``fused`` as described below, and ``cublas``: ``y = x Wᵀ + b`` by torch (cuBLAS), then ``fused_linear`` without a base adds ``s · xa Bᵀ``
into y in one pass; backward ``dx = dy W`` by torch, then ``fused_linear`` adds ``mask ⊙ (dxa A)/(1-p)`` into dx in
one pass. The rank-r passes (``project``, ``grad_out_pass``, ``outer``) are the same for both. The
contract checks, the autocast casts and the ``torch.autograd.Function`` (with the weight and bias gradients,
computed by torch as for every backend) live in ``ops.lora_linear``.

Shapes: ``x [..., in]`` (any leading dims and strides), ``W [out, in]`` (``[in, out]`` with
``fan_in_fan_out``, handled by strides), ``A [r, in]``, ``B [out, r]``; ``M`` is the number of rows of ``x``
(M/N/K as in Triton's matmul tutorial: M rows, N output features, K the reduced features). ``xa = drop(x) Aᵀ``
``[M, r]`` and ``dxa = s · dy B`` ``[M, r]`` are the two small products.

**Why this fusion.** The base GEMM ``x Wᵀ`` costs ``2·M·in·out`` FLOPs; everything low-rank is ``O(M·(in+out)·r)``
and therefore memory-bound: what it costs is passes over ``M × in`` and ``M × out`` tensors (each ≈6% of the base
GEMM on an H100 at d = 4096, M = 8192; ``../shared/research/performance.md`` §6). So:

- forward, two launches. ``low_rank.project`` computes the small product ``xa [M, r]`` in one pass over
  x (dropout applied on the fly: the mask is hashed from the seed once, here, and written bit-packed, ``M·in/8``
  bytes; the dropped x is never stored). ``fused_linear`` is the base GEMM that also owns the
  expand: each output tile first gets ``s · xa Bᵀ`` (a rank-r dot) in its fp32 accumulator, then the K loop adds
  ``x Wᵀ``, then the bias; the output is written once and no ``[M, out]`` delta exists. (The rank-r term goes in
  first, not in the epilogue, so that the tile needs one accumulator, not two: two spill registers on an H100.)
  Computing ``xa`` inside the GEMM instead would redo it, mask included, once per output-column tile
  (``out / BLOCK_N`` times): more work than the one extra read of x it saves.
- backward, three launches, each a single pass over its big operand: ``dxa = s · dy B`` and ``dB = s · dyᵀ xa``
  from one read of dy (``grad_out_pass``: per-row-block fp32 partials of dB, written and read back, cost half the
  bytes of a 16-bit dy at r = 16, instead of a second read of dy); ``dA = dxaᵀ drop(x)`` (``low_rank.outer``); both reductions over rows
  go through fp32 partials that torch sums in a fixed order, so results are deterministic (no atomics); and
  ``dx = dy W + mask ⊙ (dxa A) / (1 - p)``, the same fused GEMM reading the saved mask bits for its output tile.
  No random numbers are drawn in backward. Fusing ``dA`` into the dx GEMM would save one pass over x but needs
  cross-program atomic adds (non-deterministic fp32 sums); not taken.

Saved for backward: x as it came (no copy unless its leading dims cannot be flattened as a view, and then only
transiently), the ``[M, r]`` product and, with dropout, the packed keep-mask (``[M, ceil(in/8)]`` uint8; bit ``b``
of byte ``j`` of a row keeps element ``8j + b``). The mask is a hash of (seed, flat index)
(``_utils.dropout_keep``), the same bits ``reference.lora_linear.keep_bits`` computes with torch ops.

Dtypes: x and W fp32, fp16 or bf16 (the same); adapters fp32 (peft's default on half-precision bases) or the
input's dtype. The base GEMM runs on x's dtype; the low-rank path on the adapters' dtype (x and dy are cast to
it); all with fp32 accumulators. Dots on fp32 operands follow ``torch.get_float32_matmul_precision()``
(``_utils.fp32_dot_precision``), except that an fp32 rank-r term landing in a 16-bit output uses TF32. Under
``torch.autocast`` ``ops.lora_linear`` casts all operands to the autocast dtype first, as autocast does to the reference's
``F.linear`` calls.

Tiles: autotuned on CUDA over the configs listed with each kernel, pruned per call to those that compile for
sm_90a without register spills (``tests/kernel_ops/test_kernels_compile_for_h100.py`` checks this offline); under
the interpreter one small fixed tile. GPU performance is unmeasured.

Gradients: x, A and B by these kernels; if W or the bias require grad (not the LoRA case), ``ops.lora_linear``
computes ``dyᵀ x`` and ``Σ dy`` with torch (a plain cuBLAS GEMM and a reduction: nothing low-rank to fuse).
"""

from __future__ import annotations

import torch

from . import strategy
from ._utils import on_device, row_class
from .fused_linear import fused_linear
from .grad_out_pass import grad_out_pass
from .low_rank import outer, project

__all__ = ["backward", "base_and_expand", "forward", "strategy_for"]


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` → ``[M, k]``: a view whenever the leading dims can be flattened, a copy otherwise."""
    return tensor.reshape(-1, tensor.shape[-1])


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def _strategy_key(n_rows, x, lora_A, lora_B):
    """What ``strategy.choose`` caches its timing under: the same in forward and backward."""
    return (
        row_class(n_rows),
        lora_A.shape[1],
        lora_B.shape[0],
        lora_A.shape[0],
        x.dtype,
        lora_A.dtype,
        x.device,
    )


def strategy_for(n_rows: int, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str | None:
    """Read-only: the strategy a dense call with ``n_rows`` rows of ``x``'s width, dtype and device and these
    adapters runs (``strategy.current``; None: ``auto`` has not timed it yet). Only shapes, dtypes and devices are
    read, so empty ``[0, in]``, ``[r, in]``, ``[out, r]`` tensors will do."""
    return strategy.current(_strategy_key(n_rows, x, lora_A, lora_B), n_rows, x.device)


def base_and_expand(strategy_name, x_rows, base_weight, bias, xa, lora_B, scaling):
    """``x Wᵀ + b + s · xa Bᵀ`` → ``[M, out]`` in x's dtype: one fused GEMM, or torch's GEMM (cuBLAS on CUDA)
    followed by our rank-r epilogue adding into its output."""
    if strategy_name == "fused":
        return fused_linear(x_rows, base_weight.T, bias, xa, lora_B.T, scaling, x_rows.dtype)
    base = torch.addmm(bias, x_rows, base_weight.T) if bias is not None else x_rows @ base_weight.T
    return fused_linear(None, None, None, xa, lora_B.T, scaling, base.dtype, out=base)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``(y [..., out], xa [M, r], keep_bits)``: the output in x's dtype (the adapters' when ``weight`` is None),
    the product ``drop(x) Aᵀ`` in the adapters' dtype and, when ``dropout_p > 0``, the keep-mask drawn from
    ``seed`` (an int64 ``[1]`` tensor on x's device) as ``[M, ceil(in/8)]`` uint8, else None; ``backward`` takes
    the last two back.

    Operands as ``ops.lora_linear`` checks them: x and W (and the bias) in one of fp32, fp16, bf16; A and B in
    one of them; all on one CUDA device (or the CPU under ``TRITON_INTERPRET=1``); any strides.
    """
    with on_device(x):
        x_rows = _as_rows(x)
        # [M, r], in the adapters' dtype: the one intermediate backward needs besides x.
        xa, keep_bits = project(x_rows, lora_A.T, _keep_scale(dropout_p), seed, dropout_p)
        if weight is None:
            out = fused_linear(None, None, None, xa, lora_B.T, scaling, lora_A.dtype)
        else:
            base_weight = weight.T if fan_in_fan_out else weight  # [out, in], a view
            candidates = {
                name: (
                    lambda name=name: base_and_expand(name, x_rows, base_weight, bias, xa, lora_B, scaling)
                )
                for name in ("fused", "cublas")
            }
            key = _strategy_key(x_rows.shape[0], x, lora_A, lora_B)
            chosen = strategy.choose(key, x_rows.shape[0], x.device, candidates)
            out = base_and_expand(chosen, x_rows, base_weight, bias, xa, lora_B, scaling)
    return out.reshape(*x.shape[:-1], out.shape[-1]), xa, keep_bits


def backward(
    grad_out, x, weight, lora_A, lora_B, xa, keep_bits, scaling, dropout_p, fan_in_fan_out, needs,
    strategy_name=None,
):  # fmt: skip
    """``(dx, dA, dB)`` for ``dy = grad_out [..., out]``, each None unless ``needs`` (three bools) asks for it.

    ``dx`` (x's dtype) includes the base term ``dy W``; ``dA``/``dB`` are in the adapters' dtype. The weight and
    bias gradients are ``ops.lora_linear``'s, computed the same way for every backend. ``strategy_name``
    (``"fused"`` or ``"cublas"``) runs dx's GEMM that way instead of the dense op's choice for this key (the 4-bit
    op passes the one its own forward chose).
    """
    need_x, need_A, need_B = needs
    with on_device(grad_out):
        x_rows, grad_rows = _as_rows(x), _as_rows(grad_out)
        keep_scale = _keep_scale(dropout_p)
        grad_x = grad_A = grad_B = None
        if need_B:  # dxa [M, r] and dB from one read of dy
            dxa, grad_B = grad_out_pass(grad_rows, lora_B, xa, scaling)
        elif need_x or need_A:
            dxa = project(grad_rows, lora_B, scaling)[0]
        if need_A:
            grad_A = outer(x_rows, dxa, keep_scale, keep_bits=keep_bits)
        if need_x:
            chosen = "fused"
            if weight is not None:
                base_weight = weight.T if fan_in_fan_out else weight  # [out, in]
                key = _strategy_key(x_rows.shape[0], x, lora_A, lora_B)
                chosen = strategy_name or strategy.choose(key, x_rows.shape[0], x.device, None)
            if chosen == "cublas":  # dx = dy W by torch, then mask ⊙ (dxa A)/(1-p) added in one pass
                grad_x = grad_rows.to(base_weight.dtype) @ base_weight
                grad_x = fused_linear(
                    None, None, None, dxa, lora_A, keep_scale, x.dtype, keep_bits, out=grad_x
                )
            else:
                grad_x = fused_linear(
                    grad_rows if weight is not None else None,
                    base_weight if weight is not None else None,
                    None,
                    dxa,
                    lora_A,
                    keep_scale,
                    x.dtype,
                    keep_bits,
                )
            grad_x = grad_x.reshape(x.shape)
    return grad_x, grad_A, grad_B
