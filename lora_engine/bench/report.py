"""The terminal report: one table row per case (times, memory, and the targets beside their figures), then every
target's verdict, including those for the other kind of device."""

from __future__ import annotations

from lora_engine.bench.measure import CaseResult
from lora_engine.bench.targets import TARGETS, Check

HEADER = (
    "workload",
    "shape",
    "dtype",
    "ours",
    "peft",
    "ours/peft",
    "saved ours/peft",
    "peak ours/peft",
    "notes",
)


def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if abs(count) < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} GiB"


def _time_cell(result: CaseResult, impl: str) -> str:
    stats = result.time.get(impl)
    if stats is None:
        return "-"
    spread = (stats.p80 - stats.p20) / 2 / stats.median * 100 if stats.median else 0.0
    return f"{format_seconds(stats.median)} ±{spread:.0f}%"


def _memory_cell(values: dict | None, ratio: float | None) -> str:
    if not values:
        return "-"
    cell = f"{format_bytes(values.get('ours'))} / {format_bytes(values.get('peft'))}"
    return cell + (f" = {ratio:.2f}" if ratio is not None else "")


def _notes(result: CaseResult, checks: list[Check], context: dict) -> str:
    notes = []
    if result.parity is not None and not result.parity["ok"]:
        notes.append(f"OUTPUTS DIFFER (rel {result.parity['max_rel_diff']:.1e})")
    if "base" in result.time:
        notes.append(
            f"base {format_seconds(result.time['base'].median)}, ours/base {result.ratio('time', other='base'):.2f}"
        )
    bandwidth = context.get("copy_bandwidth_bytes_per_s")
    if result.bytes_moved and "ours" in result.time:
        achieved = result.bytes_moved / result.time["ours"].median
        notes.append(
            f"ours {achieved / 1e9:.3g} GB/s"
            + (f" ({achieved / bandwidth:.0%} of copy)" if bandwidth else "")
        )
    notes += [check.describe() for check in checks if check.result is result]
    return "; ".join(notes)


def table_rows(results: list[CaseResult], checks: list[Check], context: dict) -> list[tuple[str, ...]]:
    rows = []
    for result in results:
        case = result.case
        ratio = result.ratio("time")
        ratio_spread = result.ratio_spread("time")
        rows.append(
            (
                case.name,
                case.shape,
                case.dtype,
                _time_cell(result, "ours"),
                _time_cell(result, "peft"),
                f"{ratio:.2f} [{ratio_spread[0]:.2f}, {ratio_spread[1]:.2f}]" if ratio is not None else "-",
                _memory_cell(result.saved_bytes, result.ratio("saved")),
                _memory_cell(result.peak_bytes, result.ratio("peak")),
                _notes(result, checks, context),
            )
        )
    return rows


def render_table(results: list[CaseResult], checks: list[Check], context: dict) -> str:
    """The table, one row per case; times are medians ± half the p20-p80 spread; a time ratio is that of the
    medians, with the [p20, p80] of the round-by-round ratios."""
    rows = [HEADER, *table_rows(results, checks, context)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  -----")
    return "\n".join(lines)


def render_targets(checks: list[Check], device: str) -> str:
    """Every target with its verdict: met where every case it applies to meets it at the unfavourable end of
    its spread (``Check.decisive``); each figure is given as median [p20, p80]."""
    lines = ["targets:"]
    for target in TARGETS:
        own = [check for check in checks if check.target is target]
        if target.device != device:
            verdict = f"not measured ({target.device} target)"
        elif not own or all(check.met is None for check in own):
            verdict = "not measured (no case in this run)"
        else:
            failed = [check for check in own if check.met is False]
            values = ", ".join(check.describe_value() for check in own if check.value is not None)
            end = "p20" if target.at_least else "p80"
            verdict = f"{'NOT met' if failed else 'met'} at the {end} ({values})"
        lines.append(f"  [{target.device}] {target.text}: {verdict}")
    return "\n".join(lines)
