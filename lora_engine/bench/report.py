"""The terminal report: one table row per case (times, memory, and the targets beside their figures; on a CUDA
sweep also the roofline and the strategy ``auto`` chose), then every target's verdict, including those for the
other kind of device."""

from __future__ import annotations

from lora_engine.bench.measure import CaseResult
from lora_engine.bench.targets import TARGETS, Check, adapters_left, growth_over_batch

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
        note = f"base {format_seconds(result.time['base'].median)}, ours/base {result.ratio('time', other='base'):.2f}"
        if "peft" in result.time:  # peft/base bounds the speed-up over peft that any LoRA could reach
            note += f", peft/base {result.ratio('time', impl='peft', other='base'):.2f}"
        notes.append(note)
    bandwidth = context.get("copy_bandwidth_bytes_per_s")
    if result.bytes_moved and "ours" in result.time:
        achieved = result.bytes_moved / result.time["ours"].median
        notes.append(
            f"ours {achieved / 1e9:.3g} GB/s"
            + (f" ({achieved / bandwidth:.0%} of copy)" if bandwidth else "")
        )
    if result.strategy is not None:
        notes.append(f"auto: {result.strategy}")
    for impl, figures in (result.figures or {}).items():
        if result.case.workload == "adapter_memory":
            notes.append(
                f"{impl} live: base {format_bytes(figures['base'])}, {format_bytes(figures['before_batch'])} "
                f"loaded, x{growth_over_batch(figures):.3f} after the mixed batch, "
                f"{format_bytes(figures['after_deletes'])} after deletes = base + "
                f"{adapters_left(figures):.2f} adapters"
            )
    notes += [check.describe() for check in checks if check.result is result]
    return "; ".join(notes)


#: Columns a CUDA sweep adds after ``ours/peft``.
ROOFLINE_HEADER = ("roofline", "ours/roofline")


def _roofline_cells(result: CaseResult) -> tuple[str, str]:
    if result.roofline_s is None:
        return "-", "-"
    ours = result.time.get("ours")
    return format_seconds(result.roofline_s), f"{ours.median / result.roofline_s:.3g}" if ours else "-"


def table_rows(results: list[CaseResult], checks: list[Check], context: dict) -> list[tuple[str, ...]]:
    """One row per case, ``HEADER``'s columns, with ``ROOFLINE_HEADER``'s after ``ours/peft`` when the context
    holds roofline peaks (a CUDA sweep)."""
    rows = []
    roofline = "roofline_peaks" in context
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
                *(_roofline_cells(result) if roofline else ()),
                _memory_cell(result.saved_bytes, result.ratio("saved")),
                _memory_cell(result.peak_bytes, result.ratio("peak")),
                _notes(result, checks, context),
            )
        )
    return rows


def render_table(results: list[CaseResult], checks: list[Check], context: dict) -> str:
    """The table, one row per case; times are medians ± half the p20-p80 spread; a time ratio is that of the
    medians, with the [p20, p80] of the round-by-round ratios. A CUDA sweep adds the roofline columns and states
    the peaks they assume above the table."""
    header = HEADER
    if "roofline_peaks" in context:
        split = HEADER.index("ours/peft") + 1
        header = (*HEADER[:split], *ROOFLINE_HEADER, *HEADER[split:])
    rows = [header, *table_rows(results, checks, context)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  -----")
    if "roofline_peaks" in context:
        lines.insert(0, context["roofline_peaks"]["text"])
    return "\n".join(lines)


def render_targets(checks: list[Check], device: str) -> str:
    """Every target with its verdict: met where every case it applies to meets it at the unfavourable end of
    its spread (``Check.decisive``); each figure is given as median [p20, p80]."""
    lines = ["targets:"]
    for target in TARGETS:
        own = [check for check in checks if check.target is target]
        if target.device not in (device, "any"):
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
