"""The performance targets, checked against a run's figures and reported beside them as met / not met.

They are goals, never test assertions. CPU targets hold for the reference backend (the only one on the CPU);
GPU targets are for the Triton kernels and are checked only on a CUDA run; ``"any"`` targets (memory, which does
not depend on the device) on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_engine.bench.measure import CaseResult
from lora_engine.bench.suite import DROPOUT

#: The GPU layer targets' shape: hidden 4096, r 16, 8192 tokens.
REFERENCE_LAYER = dict(in_features=4096, out_features=4096, r=16, tokens=8192)


@dataclass(frozen=True)
class Check:
    """One target checked on one case: ``value`` against the target's limit (None: not measurable there)."""

    target: Target
    result: CaseResult
    value: float | None
    #: ``(p20, p80)`` of ``value`` (equal to it for exact figures such as bytes).
    value_spread: tuple[float, float] | None = None

    @property
    def decisive(self) -> float | None:
        """The figure the verdict rests on: the unfavourable end of the spread (p80 for an upper limit, p20
        for a lower one), so that a target is met only when 80% of the rounds meet it, not only the median."""
        if self.value is None or self.value_spread is None:
            return self.value
        return self.value_spread[0] if self.target.at_least else self.value_spread[1]

    @property
    def met(self) -> bool | None:
        value = self.decisive
        if value is None:
            return None
        return value >= self.target.limit if self.target.at_least else value <= self.target.limit

    def describe_value(self) -> str:
        """``value [p20-p80]``, or ``value`` alone for exact figures."""
        low, high = self.value_spread or (self.value, self.value)
        if low == high:
            return f"{self.value:.2f}"
        return f"{self.value:.2f} [p20 {low:.2f}, p80 {high:.2f}]"

    def describe(self) -> str:
        if self.value is None:
            return f"{self.target.short}: not measured"
        sign = ">=" if self.target.at_least else "<="
        end = "p20" if self.target.at_least else "p80"
        verdict = "met" if self.met else "NOT met"
        return f"{self.target.short} {self.describe_value()} {sign} {self.target.limit:g} ({end}): {verdict}"


@dataclass(frozen=True)
class Target:
    """``checks(results, context)`` picks the cases the target is about and computes its figure on each."""

    key: str
    device: str  # "cpu", "cuda" or "any"
    text: str
    short: str
    limit: float
    at_least: bool
    #: ``(case, figure, (p20, p80) of the figure or None)`` for each case the target applies to.
    checks: Callable[
        [list[CaseResult], dict], list[tuple[CaseResult, float | None, tuple[float, float] | None]]
    ]


def _rows(results, family, label=None, **params):
    return [
        result
        for result in results
        if result.case.family == family
        and (label is None or result.case.label == label)
        and all(result.case.params.get(key) == value for key, value in params.items())
    ]


def _per_row(family, figure, label=None, invert=False, impl="ours", other="peft", **params):
    """A check on each matching case: ``impl``'s figure over ``other``'s (``invert``: the other way round)."""

    def checks(results, context):
        found = []
        for result in _rows(results, family, label, **params):
            mine, theirs = (other, impl) if invert else (impl, other)
            found.append(
                (result, result.ratio(figure, mine, theirs), result.ratio_spread(figure, mine, theirs))
            )
        return found

    return checks


def _flatness(label):
    """Ours at the most adapters loaded over ours at the fewest, reported on the most-adapters case. The two
    were timed in different rounds, so the spread is the widest one: (p20 over p80, p80 over p20)."""

    def checks(results, context):
        rows = sorted(_rows(results, "adapters", label), key=lambda result: result.case.sweep[1])
        if len(rows) < 2:
            return []
        most, fewest = rows[-1].time["ours"], rows[0].time["ours"]
        return [(rows[-1], most.median / fewest.median, (most.p20 / fewest.p80, most.p80 / fewest.p20))]

    return checks


def _live_memory(figure):
    """A check on ours in each live-memory case: ``figure(ours' figures)``, exact (no spread)."""

    def checks(results, context):
        found = []
        for result in results:
            if result.case.workload == "adapter_memory" and result.figures and "ours" in result.figures:
                value = figure(result.figures["ours"])
                found.append((result, value, (value, value)))
        return found

    return checks


def growth_over_batch(figures: dict) -> float:
    """Live bytes after a mixed batch over those before it."""
    return figures["after_batch"] / figures["before_batch"]


def adapters_left(figures: dict) -> float:
    """Live bytes beyond the base alone after deleting all adapters but one, in units of one adapter's bytes."""
    return (figures["after_deletes"] - figures["base"]) / figures["one_adapter"]


def _merge_bandwidth(results, context):
    """Bytes a dense merge + unmerge must move over its time, as a fraction of the measured copy bandwidth."""
    copy_bandwidth = context.get("copy_bandwidth_bytes_per_s")
    found = []
    for result in results:
        if result.case.family == "merge" and result.bytes_moved and copy_bandwidth:
            stats = result.time["ours"]
            fraction = [
                result.bytes_moved / seconds / copy_bandwidth
                for seconds in (stats.median, stats.p80, stats.p20)
            ]
            found.append((result, fraction[0], (fraction[1], fraction[2])))
    return found


def _saved_with_dropout_gpu(results, context):
    layer = _per_row("lora_linear", "saved", label=f"forward+backward, dropout {DROPOUT}", **REFERENCE_LAYER)
    model = _per_row("train_step", "saved", dropout=DROPOUT)
    return layer(results, context) + model(results, context)


TARGETS = (
    Target(
        "live-after-mixed-batch",
        "any",
        "many adapters: live memory after a mixed batch over all of them at most 1.1x before it (no stacked copy)",
        "target after/before batch",
        1.1,
        False,
        _live_memory(growth_over_batch),
    ),
    Target(
        "live-after-deletes",
        "any",
        "after deleting all adapters but one: live memory beyond the base alone at most 1.1x one adapter's bytes",
        "target adapters left",
        1.1,
        False,
        _live_memory(adapters_left),
    ),
    Target(
        "cpu-train-step-time",
        "cpu",
        "training step of a tiny Llama (reference backend): ours at most 1.0x peft's time",
        "target ours/peft time",
        1.0,
        False,
        _per_row("train_step", "time", dropout=0.0),
    ),
    Target(
        "cpu-saved-bytes-dropout",
        "cpu",
        f"lora_dropout={DROPOUT}: the LoRA layers' bytes saved for backward at most 0.5x peft's",
        "target saved ours/peft",
        0.5,
        False,
        _per_row("train_step", "saved", dropout=DROPOUT),
    ),
    Target(
        "cpu-mixed-batch-8",
        "cpu",
        "mixed batch of 8 adapters: at least 1.5x faster than peft",
        "target speedup",
        1.5,
        True,
        _per_row("mixed_batch", "time", invert=True, adapters=8),
    ),
    Target(
        "cpu-switch-flat",
        "cpu",
        "adapter switch time flat in the number of adapters loaded (most / fewest loaded at most 1.5x)",
        "target flatness",
        1.5,
        False,
        _flatness("switch (set_adapter)"),
    ),
    Target(
        "cpu-load-flat",
        "cpu",
        "load_adapter time flat in the number of adapters loaded (most / fewest loaded at most 1.5x)",
        "target flatness",
        1.5,
        False,
        _flatness("load (load_adapter)"),
    ),
    Target(
        "gpu-lora-layer-speedup",
        "cuda",
        "LoRA layer fwd+bwd, hidden 4096, r 16, 8192 tokens, bf16: at least 1.3x faster than peft",
        "target speedup",
        1.3,
        True,
        _per_row("lora_linear", "time", label="forward+backward", invert=True, **REFERENCE_LAYER),
    ),
    Target(
        "gpu-lora-layer-vs-base",
        "cuda",
        "LoRA layer fwd+bwd at that shape: within 1.15x of the frozen base layer's fwd + input-grad time",
        "target ours/base",
        1.15,
        False,
        _per_row("lora_linear", "time", label="forward+backward", other="base", **REFERENCE_LAYER),
    ),
    Target(
        "gpu-merge-bandwidth",
        "cuda",
        "dense merge: at least 70% of HBM bandwidth (measured device-to-device copy bandwidth)",
        "target of copy bw",
        0.70,
        True,
        _merge_bandwidth,
    ),
    Target(
        "gpu-saved-bytes-dropout",
        "cuda",
        f"lora_dropout={DROPOUT}: bytes saved for backward at most 0.5x peft's (reference layer; LoRA layers "
        "of a training step)",
        "target saved ours/peft",
        0.5,
        False,
        _saved_with_dropout_gpu,
    ),
)


def check_targets(results: list[CaseResult], device: str, context: dict) -> list[Check]:
    """Every check of every target for ``device`` on ``results``."""
    return [
        Check(target, result, value, value_spread)
        for target in TARGETS
        if target.device in (device, "any")
        for result, value, value_spread in target.checks(results, context)
    ]
