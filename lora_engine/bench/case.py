"""What one benchmark case is (``Case``) and what a workload builds for one implementation (``Runner``).

A ``Case`` is pure data (it is pickled into the child process that measures peak RSS): which workload, at which
shape, swept along which axis. ``case.build(impl, device, **case.params)`` returns a ``Runner`` for one
implementation: ``"ours"`` (lora_engine), ``"peft"`` (peft + bitsandbytes), or ``"base"`` (the frozen base layer
alone, a lower bound for a LoRA layer's time). Every implementation of a case gets identical base weights,
identical adapter weights and identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

IMPLS = ("ours", "peft")


@dataclass(frozen=True)
class Case:
    """One measured point: a workload at one shape.

    ``family`` groups cases into one report section and one PNG; ``label`` is the case's line in that plot;
    ``workload`` is the issue's workload name (one pytest-benchmark file each); ``sweep`` is the plot's x axis,
    ``(axis name, value)``. ``deterministic`` is False where the implementations draw different random numbers
    (dropout), so their outputs are not compared. ``timed`` is False for a case that reports figures instead of
    a time: its runner's ``run()`` is called once and returns ``{figure name: value}``.
    """

    family: str
    workload: str
    label: str
    build: Callable[..., Runner]
    params: dict
    shape: str
    dtype: str
    sweep: tuple[str, int]
    impls: tuple[str, ...] = IMPLS
    deterministic: bool = True
    timed: bool = True

    @property
    def name(self) -> str:
        return f"{self.family}: {self.label}"

    @property
    def key(self) -> str:
        """Unique within a suite; used as the pytest id and to find a case again."""
        return f"{self.family}/{self.label}/{self.shape}/{self.dtype}"


@dataclass
class Runner:
    """One implementation of a case, ready to run.

    - ``run()``: the timed call. Returns what to compare across implementations (a tensor, a tuple of tensors)
      or None; for an untimed case (``Case.timed`` False), the figures ``{name: value}`` of its one call.
    - ``reset()``: untimed, before every timed call; restores state a call changed (e.g. deletes the adapter a
      load added). None when calls leave the state as they found it.
    - ``forward()``: the grad-enabled forward alone, for counting the bytes saved for backward; None for
      workloads with no backward.
    - ``saved_scope``: count only tensors saved inside these modules' forwards (the LoRA layers of a model);
      None counts the whole forward.
    - ``parameters``: their storages are never counted as saved (they exist anyway).
    - ``bytes_moved``: the bytes one call must read and write at the least, for a bandwidth figure.
    - ``copies``: how many independent copies ``run`` rotates through; warm-up runs each at least once.
    - ``keep``: objects that must live as long as the runner (a temporary folder); ``close()`` cleans them up.
    """

    run: Callable[[], object]
    reset: Callable[[], None] | None = None
    forward: Callable[[], object] | None = None
    saved_scope: Sequence[nn.Module] | None = None
    parameters: Sequence[torch.Tensor] = ()
    bytes_moved: int | None = None
    copies: int = 1
    keep: list = field(default_factory=list)

    def close(self) -> None:
        """Clean up what ``keep`` holds (a process ending with ``os._exit`` runs no finalizers)."""
        for held in self.keep:
            if hasattr(held, "cleanup"):
                held.cleanup()
        self.keep.clear()


def build_runner(case: Case, impl: str, device: torch.device) -> Runner:
    """The ``Runner`` of ``impl`` for ``case`` on ``device``."""
    if impl not in case.impls:
        raise ValueError(f"case {case.key!r} has no implementation {impl!r}; it has {case.impls}")
    return case.build(impl, device, **case.params)
