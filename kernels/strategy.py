"""Which strategy runs the dense LoRA linear's GEMMs: ``fused`` (our Triton GEMM owns the base matmul and the
rank-r term) or ``cublas`` (torch's matmul, i.e. cuBLAS, for the base; our kernels for the rank-r epilogue).

A Triton GEMM of the fused kind reaches roughly 76–95% of cuBLAS on Hopper (``../shared/research/gpu-review.md``),
and below ~97% the fusion's saved passes do not pay for it. Which one wins depends on the shape and the GPU, and
cannot be measured where this was written, so the choice is made where it runs:

- ``LORA_ENGINE_LORA_GEMM`` = ``auto`` (default), ``fused`` or ``cublas``, read on every call; another value raises
  ``ValueError`` naming it.
- ``auto``: ≤ 64 rows (decode, generation) always ``cublas``: a GEMM tile would be mostly padding. On CUDA, the
  first call for a key (row class of ``_utils.row_class``, the layer's in/out/rank, dtypes, bias, device) times
  both forwards (``triton.testing.do_bench``) and keeps the faster for every later call with that key, forward and
  backward, in this process; the backward follows the forward's choice untimed. Inside a CUDA-graph capture
  nothing can be timed: an untimed key runs ``cublas`` there (not cached). Off CUDA (the Triton interpreter)
  ``fused``: there is nothing to time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import torch

ENV_VAR = "LORA_ENGINE_LORA_GEMM"
STRATEGIES = ("auto", "fused", "cublas")
SMALL_ROWS = 64

_chosen: dict[Hashable, str] = {}


def requested() -> str:
    """The setting of ``LORA_ENGINE_LORA_GEMM``: ``"auto"``, ``"fused"`` or ``"cublas"``; raises on another value."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value not in STRATEGIES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a strategy; choose one of {', '.join(STRATEGIES)}")
    return value


def choose(
    key: Hashable, n_rows: int, device: torch.device, candidates: dict[str, Callable[[], object]] | None
) -> str:
    """``"fused"`` or ``"cublas"`` for a call with ``n_rows`` rows on ``device``, as the module docstring says.

    ``candidates`` maps each strategy to a thunk running it (timed on the first CUDA call for ``key``); the
    backward passes None and gets the forward's choice.
    """
    known = current(key, n_rows, device)
    if known is not None:
        return known
    if candidates is None or torch.cuda.is_current_stream_capturing():
        return "cublas"
    import triton.testing

    timings = {name: triton.testing.do_bench(run, warmup=5, rep=20) for name, run in candidates.items()}
    _chosen[key] = min(timings, key=timings.get)
    return _chosen[key]


def current(key: Hashable, n_rows: int, device: torch.device) -> str | None:
    """What ``choose`` answers for this call without timing anything: the forced setting, ``"cublas"`` for ≤ 64
    rows, ``"fused"`` off CUDA, ``auto``'s cached choice for ``key``; None where ``auto`` has not timed ``key``
    yet. Read-only."""
    setting = requested()
    if setting != "auto":
        return setting
    if n_rows <= SMALL_ROWS:
        return "cublas"
    if device.type != "cuda":
        return "fused"
    return _chosen.get(key)


def chosen() -> dict[Hashable, str]:
    """A copy of what ``auto`` chose so far in this process, per key (for the benchmark's report)."""
    return dict(_chosen)
