"""``lora-engine bench``: run lora_engine and peft (+ bitsandbytes) on the same inputs, print the table, write
``<out>/<device>-<date>.json`` and one ``<device>-<date>-<family>.png`` per workload family.

``--interpret`` runs the CUDA sweep's code on CPU tensors: the CUDA smoke cases with ``LORA_ENGINE_BACKEND=triton``
under the Triton interpreter (``TRITON_INTERPRET=1`` set before Python starts, as triton reads it at import), the
CUDA targets, the roofline columns (peaks assumed, said so) and the strategy notes. Its figures mean nothing; it
exists so that code only a GPU run would reach has run (``tests/test_bench_interpreted.py``).

Needs the ``bench`` extra (peft, matplotlib); without it ``main`` says how to install it and returns 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import os
import signal
import sys
import time
import warnings
from pathlib import Path

INSTALL_HINT = (
    "lora-engine bench compares against peft and draws plots with matplotlib; install them with the bench extra: "
    'pip install -e ".[bench]"   (or: pip install "lora-engine[bench]")'
)


def _parser() -> argparse.ArgumentParser:
    from lora_engine.bench.suite import FAMILIES

    parser = argparse.ArgumentParser(
        prog="lora-engine bench",
        description="Benchmark lora_engine against peft (+ bitsandbytes): same process, same inputs, interleaved.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sweep: under 10 minutes on a 2-core CPU")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, one timed call each: checks that every workload runs (figures are meaningless)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to run (default: cuda if available, else cpu); cuda sweeps hidden 4096 / 11008, bf16",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON and PNGs (default: benchmarks/results)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated workload families to run (default: all of {','.join(FAMILIES)})",
    )
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="with --smoke: run the CUDA sweep's code (Triton kernels, roofline, strategy) on CPU tensors under "
        "the Triton interpreter; needs TRITON_INTERPRET=1 in the environment; figures are meaningless",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, 1 if a case failed, 2 for a usage or installation problem."""
    missing = [name for name in ("peft", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"missing {', '.join(missing)}. {INSTALL_HINT}", file=sys.stderr)
        return 2
    import torch

    args = _parser().parse_args(argv)
    if args.interpret:
        problem = _interpret_problem(args)
        if problem:
            print(f"--interpret: {problem}", file=sys.stderr)
            return 2
    device_type = "cpu" if args.interpret else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    from lora_engine.bench.suite import FAMILIES

    families = tuple(name.strip() for name in args.only.split(",")) if args.only else FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"--only: unknown families {unknown}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    device = torch.device(device_type)
    if not args.interpret:
        return run(device, mode, families, args.out, peak=not args.no_peak)
    from lora_engine import backend

    with _environment(**{backend.ENV_VAR: "triton"}):
        return run(device, mode, families, args.out, peak=False, sweep="cuda")


def _interpret_problem(args) -> str | None:
    """Why ``--interpret`` cannot run with ``args``, or None."""
    if not args.smoke:
        return "only with --smoke (tiny shapes: the interpreter runs each kernel program in Python)"
    if args.device == "cuda":
        return "runs on CPU tensors; drop --device cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "set TRITON_INTERPRET=1 in the environment before starting (triton reads it at import)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set to ``values`` inside, restored after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(
    device,
    mode: str,
    families: tuple[str, ...],
    out_dir: Path | None,
    peak: bool = True,
    sweep: str | None = None,
) -> int:
    """Measure every case of ``families``, report, write the JSON and the plots; 1 if any case failed.

    ``sweep``: whose cases, targets and report columns (``"cpu"`` or ``"cuda"``); ``device.type`` by default,
    ``"cuda"`` on CPU tensors for ``--interpret``."""
    from lora_engine.bench import plots, report, results, roofline, suite
    from lora_engine.bench.measure import copy_bandwidth
    from lora_engine.bench.targets import check_targets

    sweep = sweep or device.type
    interpreted = sweep != device.type
    started = time.perf_counter()
    context = {
        "copy_bandwidth_bytes_per_s": copy_bandwidth(device, 2**24 if mode == "smoke" else None),
        "sweep": f"{sweep} (interpreted on the {device.type})" if interpreted else sweep,
    }
    if sweep == "cuda":
        peaks = roofline.peaks_for(None if interpreted else results.device_name(device))
        context["roofline_peaks"] = {
            "flops": peaks.flops,
            "bandwidth": peaks.bandwidth,
            "source": peaks.source,
            "text": peaks.describe(),
        }
    measured, failed = _measure_all(suite.cases(sweep, mode, families), device, mode, peak)
    if sweep == "cuda":
        _add_roofline_and_strategy(measured, device, peaks)
    checks = check_targets(measured, sweep, context)
    title = f"{results.device_name(device)}, {mode} mode"
    if interpreted:
        title += ", CUDA sweep interpreted on the CPU"
    print(
        f"\nlora_engine vs peft on {title} (medians ±half the p20-p80 spread; ours/peft < 1: ours better)\n"
    )
    print(report.render_table(measured, checks, context))
    print()
    print(report.render_targets(checks, sweep))

    out_dir = out_dir if out_dir is not None else results.default_out_dir()
    kind = f"{device.type}-interpreted" if interpreted else device.type
    stem = f"{kind}-{datetime.date.today().isoformat()}" + ("-smoke" if mode == "smoke" else "")
    json_path = out_dir / f"{stem}.json"
    results.write_json(results.run_record(mode, device, measured, checks, context), json_path)
    written = [json_path, *plots.plot_families(measured, out_dir, stem, title)]
    print(f"\n{len(measured)} cases in {time.perf_counter() - started:.0f} s; wrote:")
    for path in written:
        print(f"  {path}")
    if failed:
        print(f"{len(failed)} cases FAILED: {', '.join(case.key for case in failed)}", file=sys.stderr)
        return 1
    return 0


def _add_roofline_and_strategy(measured, device, peaks) -> None:
    """Each result's roofline time and, for a dense or 4-bit LoRA layer, the strategy ``auto`` ran."""
    from lora_engine.bench import kernel_choice, roofline

    for result in measured:
        work = roofline.work_of(result.case)
        result.roofline_s = work.seconds(peaks) if work is not None else None
        result.strategy = kernel_choice.dense_strategy(result.case, device) or kernel_choice.nf4_strategy(
            result.case, device
        )


class _Stopped(Exception):
    """SIGTERM arrived (a ``timeout`` around the run): stop measuring, report what was measured."""


def _stop(signum, frame):
    raise _Stopped


def _measure_all(cases, device, mode: str, peak: bool):
    """``(results, failed cases)``; progress goes to stderr, one line per case. On SIGTERM the cases not yet
    measured count as failed, and the run reports the others (``gpu_session.sh`` bounds each phase by
    ``timeout``)."""
    from lora_engine.bench.measure import measure_case
    from lora_engine.bench.timing import PLANS

    measured, failed = [], []
    # The imported libraries' objects live for the whole run: keep them out of the collection the timing makes
    # before each case (a full one over them takes a third of a second). Unfrozen after, so exit frees them.
    gc.freeze()
    previous_handler = signal.signal(signal.SIGTERM, _stop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # transformers' deprecation notices, once per model
            for index, case in enumerate(cases, 1):
                print(
                    f"[{index:>3}/{len(cases)}] {case.name}  {case.shape} ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
                case_start = time.perf_counter()
                try:
                    measured.append(measure_case(case, device, PLANS[mode], peak=peak))
                except _Stopped:
                    failed += cases[index - 1 :]
                    print(f"STOPPED (SIGTERM): {len(cases) - index + 1} cases not measured", file=sys.stderr)
                    break
                except Exception as error:  # one broken case must not hide the others' figures
                    failed.append(case)
                    print(f"FAILED: {type(error).__name__}: {error}", file=sys.stderr)
                    continue
                print(f"{time.perf_counter() - case_start:.1f} s", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        gc.unfreeze()
    return measured, failed
