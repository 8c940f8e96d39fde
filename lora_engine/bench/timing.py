"""Interleaved timing: the implementations of one case take turns (ours, peft, peft, ours, ...), so a slow spell
of a shared machine hits all of them alike; warm-up calls are excluded; each figure is a median with p20 / p80.

A sample is the mean of ``inner`` back-to-back calls, ``inner`` chosen so that a sample lasts at least
``min_sample_s`` (timer resolution and launch jitter); a runner with a ``reset`` is timed one call at a time,
the reset untimed. On CUDA the device is synchronized before and after every sample.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_engine.bench.case import Runner


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one case: at least ``min_rounds`` rounds (one sample per implementation each), then
    on until ``budget_s`` seconds per implementation are spent or ``max_rounds`` are done. ``cap_s`` bounds a
    case's timing on a busy machine: past it, no new round starts once ``MIN_ROUNDS_UNDER_CAP`` are done.
    ``warm_every_copy``: warm-up runs every copy a runner rotates through (off for smoke runs, whose figures mean
    nothing: one warm-up call each keeps an interpreted run short)."""

    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float
    min_sample_s: float
    cap_s: float = math.inf
    warm_every_copy: bool = True


MIN_ROUNDS_UNDER_CAP = 3

PLANS = {
    "smoke": TimingPlan(
        warmup=1, min_rounds=1, max_rounds=1, budget_s=0.0, min_sample_s=0.0, warm_every_copy=False
    ),
    "quick": TimingPlan(warmup=2, min_rounds=7, max_rounds=60, budget_s=0.6, min_sample_s=0.005, cap_s=8.0),
    "full": TimingPlan(warmup=5, min_rounds=20, max_rounds=500, budget_s=3.0, min_sample_s=0.02, cap_s=120.0),
}


@dataclass(frozen=True)
class Stats:
    """Seconds per call over ``samples`` samples of ``inner`` calls each. ``seconds`` keeps the samples in
    round order, so that two implementations timed together can be compared round by round."""

    median: float
    p20: float
    p80: float
    samples: int
    inner: int
    seconds: tuple[float, ...] = ()

    @classmethod
    def of(cls, seconds: list[float], inner: int) -> Stats:
        median, p20, p80 = spread(seconds)
        return cls(median, p20, p80, len(seconds), inner, tuple(seconds))

    def as_dict(self) -> dict:
        return {
            "median": self.median,
            "p20": self.p20,
            "p80": self.p80,
            "samples": self.samples,
            "inner": self.inner,
        }


def spread(values: list[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``values`` (all three the value itself when there is one)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[1], deciles[7]


def paired_ratio_spread(mine: Stats, other: Stats) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``mine / other`` taken round by round: both were sampled in the same rounds
    of ``time_interleaved``, so a slow spell of the machine divides out of each round's ratio."""
    return spread([a / b for a, b in zip(mine.seconds, other.seconds, strict=True)])


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA), or does nothing (CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _sample(runner: Runner, inner: int, sync: Callable[[], None]) -> float:
    if runner.reset is not None:
        runner.reset()
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        runner.run()
    sync()
    return (time.perf_counter() - start) / inner


def time_interleaved(
    runners: dict[str, Runner], plan: TimingPlan, device: torch.device
) -> tuple[dict[str, Stats], dict[str, object]]:
    """Time every runner, interleaved. Returns ``(stats per implementation, first output per implementation)``;
    the first outputs come from the first warm-up call, where every implementation saw the same input.
    Warm-up runs every copy a runner rotates through at least once (``plan.warm_every_copy``), so no timed call is
    a copy's first."""
    sync = synchronizer(device)
    order = list(runners)
    first_outputs: dict[str, object] = {}
    fastest_warmup = dict.fromkeys(order, math.inf)
    copies = [runner.copies for runner in runners.values()] if plan.warm_every_copy else []
    warmup_calls = max(plan.warmup, 1, *copies)
    for call in range(warmup_calls):
        for impl in order:
            runner = runners[impl]
            if runner.reset is not None:
                runner.reset()
            sync()
            start = time.perf_counter()
            output = runner.run()
            sync()
            fastest_warmup[impl] = min(fastest_warmup[impl], time.perf_counter() - start)
            if call == 0:
                first_outputs[impl] = output
            del output
    inner = {
        impl: 1
        if runners[impl].reset is not None
        else max(1, min(10_000, math.ceil(plan.min_sample_s / max(fastest_warmup[impl], 1e-9))))
        for impl in order
    }
    samples: dict[str, list[float]] = {impl: [] for impl in order}
    gc.collect()
    gc.disable()  # a collection inside a sample would land on whichever implementation is running
    try:
        start = time.perf_counter()
        for round_index in range(plan.max_rounds):
            # Alternate who goes first, so that neither always runs right after the other.
            for impl in order if round_index % 2 == 0 else order[::-1]:
                samples[impl].append(_sample(runners[impl], inner[impl], sync))
            spent, rounds = time.perf_counter() - start, round_index + 1
            if rounds >= plan.min_rounds and spent >= plan.budget_s * len(order):
                break
            if rounds >= MIN_ROUNDS_UNDER_CAP and spent >= plan.cap_s:
                break
    finally:
        gc.enable()
    return {impl: Stats.of(samples[impl], inner[impl]) for impl in order}, first_outputs
