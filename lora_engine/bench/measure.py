"""Measure one case: build every implementation, time them interleaved, compare their first outputs, count the
bytes each saves for backward, and take each one's peak memory."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from lora_engine.bench import memory
from lora_engine.bench.case import Case, Runner, build_runner
from lora_engine.bench.timing import Stats, TimingPlan, paired_ratio_spread, time_interleaved

#: Largest relative difference between ours and peft's outputs still counted as the same computation.
PARITY_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


@dataclass
class CaseResult:
    """Every figure of one case; memory in bytes, times in seconds per call."""

    case: Case
    time: dict[str, Stats]
    saved_bytes: dict[str, int] | None
    #: For model workloads ``saved_bytes`` counts the LoRA layers; this counts the whole forward.
    saved_bytes_forward: dict[str, int] | None
    peak_bytes: dict[str, int | None] | None
    peak_kind: str | None
    parity: dict | None
    bytes_moved: int | None
    #: An untimed case's figures per implementation (``Case.timed``); None for a timed one.
    figures: dict[str, dict[str, float]] | None = None
    #: CUDA sweeps only: the roofline model's least time of one call (``roofline``), and the strategy the
    #: dense LoRA linear ran (``kernel_choice``); None elsewhere.
    roofline_s: float | None = None
    strategy: str | None = None

    def ratio(self, figure: str, impl: str = "ours", other: str = "peft") -> float | None:
        """``impl``'s figure over ``other``'s: ``"time"`` (median), ``"saved"`` or ``"peak"``."""
        if figure == "time":
            if impl not in self.time or other not in self.time:
                return None
            return self.time[impl].median / self.time[other].median
        values = self._byte_figures(figure)
        mine, theirs = values.get(impl), values.get(other)
        if mine is None or not theirs:
            return None
        return mine / theirs

    def ratio_spread(
        self, figure: str, impl: str = "ours", other: str = "peft"
    ) -> tuple[float, float] | None:
        """``(p20, p80)`` of ``ratio(figure, impl, other)``. Times: the round-by-round ratios' quantiles;
        bytes are exact, so both ends are the ratio itself."""
        if figure != "time":
            value = self.ratio(figure, impl, other)
            return None if value is None else (value, value)
        if impl not in self.time or other not in self.time:
            return None
        _, p20, p80 = paired_ratio_spread(self.time[impl], self.time[other])
        return p20, p80

    def _byte_figures(self, figure: str) -> dict:
        return {"saved": self.saved_bytes, "peak": self.peak_bytes}[figure] or {}


def measure_case(case: Case, device: torch.device, plan: TimingPlan, peak: bool = True) -> CaseResult:
    """All figures of ``case`` on ``device``. ``peak=False`` skips the peak-memory measurement."""
    if not case.timed:
        figures = {}
        for impl in case.impls:  # one after the other: each measures what it holds alone
            runner = build_runner(case, impl, device)
            figures[impl] = runner.run()
            runner.close()
        return CaseResult(case, {}, None, None, None, None, None, None, figures)
    runners = {impl: build_runner(case, impl, device) for impl in case.impls}
    stats, first_outputs = time_interleaved(runners, plan, device)
    parity = None
    if case.deterministic and {"ours", "peft"} <= set(first_outputs):
        parity = compare_outputs(first_outputs["ours"], first_outputs["peft"], case.dtype)
    del first_outputs

    saved = saved_forward = None
    if all(runner.forward is not None for runner in runners.values()):
        saved, saved_forward = {}, {}
        for impl, runner in runners.items():
            saved[impl] = memory.saved_tensor_bytes(runner.forward, runner.parameters, runner.saved_scope)
            if runner.saved_scope is not None:
                saved_forward[impl] = memory.saved_tensor_bytes(runner.forward, runner.parameters)
        saved_forward = saved_forward or None

    peak_bytes, peak_kind = None, None
    if peak and device.type == "cuda":
        peak_bytes = {impl: memory.cuda_peak_bytes(runner, device) for impl, runner in runners.items()}
        peak_kind = "cuda max_memory_allocated"
    bytes_moved = next(iter(runners.values())).bytes_moved
    for runner in runners.values():
        runner.close()
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if peak and device.type == "cpu":
        peak_bytes = {impl: memory.cpu_peak_rss_bytes(case, impl) for impl in case.impls}
        peak_kind = "cpu peak RSS (child process)"
        if all(value is None for value in peak_bytes.values()):
            peak_bytes, peak_kind = None, None
    return CaseResult(case, stats, saved, saved_forward, peak_bytes, peak_kind, parity, bytes_moved)


def compare_outputs(ours, theirs, dtype_name: str) -> dict:
    """``{"max_rel_diff", "ok"}``: the largest difference over all output tensors, relative to the largest
    magnitude of peft's; ``ok`` when it is within the dtype's tolerance."""
    pairs = list(zip(_tensors(ours), _tensors(theirs)))
    if not pairs:
        return None
    worst = 0.0
    for mine, reference in pairs:
        if mine.shape != reference.shape:
            return {"max_rel_diff": float("inf"), "ok": False}
        scale = reference.detach().float().abs().max().item() or 1.0
        worst = max(worst, (mine.detach().float() - reference.detach().float()).abs().max().item() / scale)
    tolerance = PARITY_TOLERANCE[dtype_name.split()[0].rstrip(",")]
    return {"max_rel_diff": worst, "ok": worst <= tolerance}


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [tensor for tensor in output if isinstance(tensor, torch.Tensor)]
    return []


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write), the median of a few large copies:
    the measured ceiling a memory-bound op (merge) is compared with."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    runner = Runner(run=lambda: target.copy_(source))
    stats, _ = time_interleaved({"copy": runner}, TimingPlan(2, 5, 5, 0.0, 0.0), device)
    return 2 * nbytes / stats["copy"].median
