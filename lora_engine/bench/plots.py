"""PNG plots: one per workload family, time (top) and memory (below) against the swept size.

One column per swept axis of the family (tokens, rank, ...); one line per (case, implementation), colour by
case, line style by implementation; bands show p20-p80. Memory is the bytes saved for backward where the family
has a backward (exact), and the peak (one measurement).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lora_engine.bench.measure import CaseResult

STYLES = {"ours": "-", "peft": "--", "base": ":"}


def plot_families(results: list[CaseResult], out_dir: Path, stem: str, title: str) -> list[Path]:
    """Write ``<stem>-<family>.png`` for each family in ``results``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_family: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        if result.case.timed:  # an untimed case's figures are in the table and the JSON, not on a time axis
            by_family[result.case.family].append(result)
    paths = []
    for family, family_results in by_family.items():
        axes_names = list(dict.fromkeys(result.case.sweep[0] for result in family_results))
        memory_rows = [
            (ylabel, figure)
            for ylabel, figure in MEMORY_ROWS
            if any(getattr(result, figure) for result in family_results)
        ]
        rows = 1 + len(memory_rows)
        figure, axes = plt.subplots(
            rows, len(axes_names), figsize=(6.5 * len(axes_names), 4 * rows), squeeze=False
        )
        for column, axis_name in enumerate(axes_names):
            on_axis = [result for result in family_results if result.case.sweep[0] == axis_name]
            _time_panel(axes[0][column], on_axis, axis_name)
            for row, (ylabel, memory_figure) in enumerate(memory_rows, 1):
                _memory_panel(axes[row][column], on_axis, axis_name, memory_figure, ylabel)
        figure.suptitle(f"{family} — {title}")
        figure.tight_layout()
        path = out_dir / f"{stem}-{family}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


#: The memory rows a family's figure can have: (y label, ``CaseResult`` field).
MEMORY_ROWS = (
    ("bytes saved for backward (MiB)", "saved_bytes"),
    ("peak memory above start (MiB)", "peak_bytes"),
)


def _lines(results: list[CaseResult]) -> dict[str, list[CaseResult]]:
    lines: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        lines[result.case.label].append(result)
    return {label: sorted(found, key=lambda result: result.case.sweep[1]) for label, found in lines.items()}


def _colors(labels):
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[index % len(cycle)] for index, label in enumerate(labels)}


def _time_panel(axis, results: list[CaseResult], axis_name: str) -> None:
    lines = _lines(results)
    colors = _colors(lines)
    plotted = []
    for label, found in lines.items():
        x = [result.case.sweep[1] for result in found]
        for impl in found[0].case.impls:
            medians = [result.time[impl].median * 1e3 for result in found]
            axis.plot(
                x, medians, STYLES.get(impl, "-."), marker="o", color=colors[label], label=f"{label} — {impl}"
            )
            axis.fill_between(
                x,
                [result.time[impl].p20 * 1e3 for result in found],
                [result.time[impl].p80 * 1e3 for result in found],
                color=colors[label],
                alpha=0.15,
            )
            plotted += medians
    _decorate(axis, axis_name, "time per call (ms), p20-p80 band", plotted)


def _memory_panel(axis, results: list[CaseResult], axis_name: str, figure: str, ylabel: str) -> None:
    lines = _lines(results)
    colors = _colors(lines)
    plotted = []
    for label, found in lines.items():
        for impl in found[0].case.impls:
            # Zero (nothing saved, no growth) has no place on a log scale: left out.
            points = [
                (result.case.sweep[1], getattr(result, figure)[impl] / 2**20)
                for result in found
                if getattr(result, figure) and getattr(result, figure).get(impl)
            ]
            if points:
                axis.plot(
                    *zip(*points),
                    STYLES.get(impl, "-."),
                    marker="o",
                    color=colors[label],
                    label=f"{label} — {impl}",
                )
                plotted += [value for _, value in points]
    if figure == "peak_bytes":
        ylabel += f"\n{next((result.peak_kind for result in results if result.peak_kind), '')}"
    if not plotted:
        axis.text(
            0.5, 0.5, "not measured, or zero throughout", ha="center", va="center", transform=axis.transAxes
        )
    _decorate(axis, axis_name, ylabel, plotted)


def _decorate(axis, axis_name: str, ylabel: str, values: list[float]) -> None:
    axis.set_xscale("log", base=2)
    positive = [value for value in values if value > 0]
    # A log scale only where the values span a decade; a narrow range reads better on a linear one.
    if positive and max(positive) / min(positive) >= 10:
        axis.set_yscale("log")
    axis.set_xlabel(axis_name)
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
