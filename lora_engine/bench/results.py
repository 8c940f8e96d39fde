"""The JSON record of a run: where it ran (device, library versions, git commit) and every figure.

Times are seconds per call with median, p20 and p80 over the samples; memory figures are bytes (saved-for-backward
counts are exact, peaks are one measurement each).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from lora_engine.bench.measure import CaseResult
from lora_engine.bench.targets import Check

SCHEMA_VERSION = 1
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "bitsandbytes",
    "lora-engine",
    "safetensors",
    "accelerate",
)


def repo_root() -> Path | None:
    """The checkout lora_engine runs from (editable install or source tree), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() and (root / "lora_engine").is_dir() else None


def default_out_dir() -> Path:
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "benchmarks" / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = repo_root()
    if root is None or not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict:
    from lora_engine import get_backend

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": {
            "type": device.type,
            "name": device_name(device),
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "versions": {package: _version(package) for package in PACKAGES}
        | {"python": platform.python_version()},
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "lora_engine_backend": get_backend(),
        "platform": platform.platform(),
    }


def result_record(result: CaseResult, checks: list[Check]) -> dict:
    case = result.case
    return {
        "family": case.family,
        "workload": case.workload,
        "case": case.label,
        "shape": case.shape,
        "dtype": case.dtype,
        "sweep": {"axis": case.sweep[0], "value": case.sweep[1]},
        "params": {key: _plain(value) for key, value in case.params.items()},
        "time_s": {impl: stats.as_dict() for impl, stats in result.time.items()},
        "time_ratio_ours_over_peft": result.ratio("time"),
        "time_ratio_ours_over_peft_p20_p80": result.ratio_spread("time"),
        "saved_bytes": result.saved_bytes,
        "saved_bytes_scope": "LoRA layers" if result.saved_bytes_forward else "forward",
        "saved_bytes_whole_forward": result.saved_bytes_forward,
        "peak_bytes": result.peak_bytes,
        "peak_kind": result.peak_kind,
        "bytes_moved": result.bytes_moved,
        "parity": result.parity,
        "figures": result.figures,
        "roofline_s": result.roofline_s,
        "strategy": result.strategy,
        "targets": [
            {
                "target": check.target.key,
                "value": check.value,
                "value_p20_p80": check.value_spread,
                "met": check.met,
            }
            for check in checks
            if check.result is result
        ],
    }


def _plain(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    return value


def run_record(
    mode: str, device: torch.device, results: list[CaseResult], checks: list[Check], context: dict
) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        **environment(device),
        "context": context,
        "results": [result_record(result, checks) for result in results],
        "targets": [
            {
                "target": check.target.key,
                "text": check.target.text,
                "case": check.result.case.key,
                "value": check.value,
                "value_p20_p80": check.value_spread,
                "decided_on": check.decisive,
                "limit": check.target.limit,
                "at_least": check.target.at_least,
                "met": check.met,
            }
            for check in checks
        ],
    }


def write_json(record: dict, path: Path) -> None:
    """Write ``record`` to ``path`` through a temporary file, so a failed write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    temporary.replace(path)
