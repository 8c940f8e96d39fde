"""Test support: the Philox dropout keep-mask that the Triton kernels draw, materialised as a tensor, so that the
reference can be fed the kernels' own mask (and the mask's statistics tested). No kernel of lora_engine needs it.

Import it only through the ``kernels`` fixture (``triton_interpreter.py``): its kernel must be decorated after
``TRITON_INTERPRET=1`` is set, like the library's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_engine.kernels._utils import dropout_keep, on_device


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[M, K]`` (uint8, row-major) = the dropout keep-mask the kernels draw over an ``[M, K]`` input."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, cols, K, dropout_p)
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out_ptr + offsets, keep.to(tl.uint8), mask=(rows < M)[:, None] & (cols < K)[None, :])


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask the kernels draw for an input of ``shape`` (``[..., in]``), drop probability ``p``
    and ``seed``: the same mask forward and backward regenerate, with the signature of
    ``reference.lora_linear.dropout_keep_mask``, which tests replace with it."""
    in_features = shape[-1]
    n_rows = int(torch.Size(shape).numel() // in_features) if in_features else 0
    keep = torch.empty(n_rows, in_features, dtype=torch.uint8, device=device)
    if keep.numel():
        block_m, block_k = 32, 128  # the mask is a function of the element index only, not of the tiling
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(in_features, block_k))
        with on_device(keep):
            _keep_mask_kernel[grid](keep, n_rows, in_features, seed, p, BLOCK_M=block_m, BLOCK_K=block_k)
    return keep.bool().reshape(shape)
