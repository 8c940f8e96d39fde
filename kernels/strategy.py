"""Which strategy runs a LoRA linear's base GEMM, chosen per shape by timing where it runs, or forced.

Two choices, each a ``Choice`` (the environment variable that forces it and the strategies it picks from):

- ``DENSE``, the dense op (``kernels.lora_linear``): ``fused`` (our Triton GEMM owns the base matmul and the
  rank-r term) or ``cublas`` (torch's matmul, i.e. cuBLAS, for the base; our kernels for the rank-r epilogue).
  Forced by ``LORA_ENGINE_LORA_GEMM``.
- ``NF4``, the 4-bit op's forward above 64 rows (``kernels.nf4_lora_linear``): ``dequant`` (``nf4_gemm``: W
  decoded tile by tile inside our Triton GEMM), or W decoded into the scratch buffer (``nf4_dequantize``) followed
  by the dense op's ``fused`` or ``cublas`` math. Forced by ``LORA_ENGINE_NF4_GEMM`` (``LORA_ENGINE_LORA_GEMM``
  does not reach it).

A Triton GEMM of the fused kind reaches roughly 76–95% of cuBLAS on Hopper (``../shared/research/gpu-review.md``),
and below ~97% the fusion's saved passes do not pay for it; a dequantize-in-GEMM saves the decode's write and
re-read of a dense W but decodes every weight once per row tile. Which one wins depends on the shape and the GPU,
and cannot be measured where this was written, so the choice is made where it runs:

- The variable = ``auto`` (default) or one of the choice's strategies, read on every call (case and surrounding
  spaces ignored); another value raises ``ValueError`` naming the variable and the value.
- ``auto``: ≤ 64 rows (decode, generation) always ``cublas``: a GEMM tile would be mostly padding (the 4-bit op
  sends 1–64 rows to its GEMV before asking). On CUDA, the first call for a key (row class of
  ``_utils.row_class``, the layer's in/out/rank, dtypes, bias, device; for the 4-bit op also its format) times
  every candidate forward (``triton.testing.do_bench``) and keeps the fastest for every later call with that key,
  forward and backward, in this process; the backward follows the forward's choice untimed. Inside a CUDA-graph
  capture nothing can be timed: an untimed key runs ``cublas`` there (not cached). Off CUDA (the Triton
  interpreter) ``fused``: there is nothing to time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

SMALL_ROWS = 64


@dataclass(frozen=True)
class Choice:
    """One op's strategy choice: ``env_var`` forces it to one of ``strategies`` (or ``auto``)."""

    env_var: str
    strategies: tuple[str, ...]


DENSE = Choice("LORA_ENGINE_LORA_GEMM", ("fused", "cublas"))
NF4 = Choice("LORA_ENGINE_NF4_GEMM", ("dequant", "fused", "cublas"))

_chosen: dict[Hashable, str] = {}


def requested(choice: Choice = DENSE) -> str:
    """The setting of ``choice.env_var``: ``"auto"`` or one of ``choice.strategies``; raises on another value."""
    value = os.environ.get(choice.env_var, "auto").strip().lower()
    allowed = ("auto", *choice.strategies)
    if value not in allowed:
        raise ValueError(f"{choice.env_var}={value!r} is not a strategy; choose one of {', '.join(allowed)}")
    return value


def choose(
    key: Hashable,
    n_rows: int,
    device: torch.device,
    candidates: dict[str, Callable[[], object]] | None,
    choice: Choice = DENSE,
) -> str:
    """One of ``choice.strategies`` for a call with ``n_rows`` rows on ``device``, as the module docstring says.

    ``candidates`` maps each strategy to a thunk running it (timed on the first CUDA call for ``key``); the
    backward passes None and gets the forward's choice.
    """
    known = current(key, n_rows, device, choice)
    if known is not None:
        return known
    if candidates is None or torch.cuda.is_current_stream_capturing():
        return "cublas"
    import triton.testing

    timings = {name: triton.testing.do_bench(run, warmup=5, rep=20) for name, run in candidates.items()}
    _chosen[key] = min(timings, key=timings.get)
    return _chosen[key]


def current(key: Hashable, n_rows: int, device: torch.device, choice: Choice = DENSE) -> str | None:
    """What ``choose`` answers for this call without timing anything: the forced setting, ``"cublas"`` for ≤ 64
    rows, ``"fused"`` off CUDA, ``auto``'s cached choice for ``key``; None where ``auto`` has not timed ``key``
    yet. Read-only."""
    setting = requested(choice)
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
