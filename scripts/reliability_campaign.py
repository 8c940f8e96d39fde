"""The local reliability campaign (not run in CI): thousands of mutated adapter files and hundreds of kills.

    .venv/bin/python scripts/reliability_campaign.py --config-cases 5000 --weights-cases 1000 --kills 200

Config and weights mutations are judged by ``tests/adapter_fuzzing.judge_load`` in worker processes; a case that
runs past ``--timeout`` seconds is a hang (its worker is killed and replaced). The kill loop
(``tests/reliability_helpers.kill_during_saves``) SIGKILLs a saving child ``--kills`` times for the default adapter
and as many for a named one, half with slowed renames so that kills land between the two renames. Prints the
counts as JSON; exits 1 if any crash, hang, unnamed error, lost state or silent wrong load was found.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from adapter_fuzzing import (  # noqa: E402 - after the path set-up above
    Finding,
    judge_load,
    mutate_config_text,
    mutate_weights_bytes,
    write_values_mutation,
)
from reliability_helpers import (  # noqa: E402
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_version,
    as_peft_saved,
    kill_during_saves,
)

_state: dict = {}


def _start_worker(pristine: str) -> None:
    import torch

    torch.set_num_threads(1)
    _state["pristine"] = Path(pristine)
    _state["host"] = adapter_version(0, adapter_name="keep")


def _run_case(kind: str, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lora-engine-fuzz-") as scratch:
        folder = Path(scratch)
        shutil.copytree(_state["pristine"], folder, dirs_exist_ok=True)
        if kind == "config":
            text = (folder / CONFIG_FILE).read_text()
            (folder / CONFIG_FILE).write_bytes(mutate_config_text(text, rng))
        elif rng.random() < 0.15:
            write_values_mutation(folder, rng)
        else:
            data = (folder / WEIGHTS_FILE).read_bytes()
            (folder / WEIGHTS_FILE).write_bytes(mutate_weights_bytes(data, rng))
        try:
            return judge_load(_state["host"], folder), ""
        except Finding as finding:
            return finding.kind, str(finding)


def run_mutations(kind: str, cases: int, pristine: Path, workers: int, timeout: float) -> dict:
    counts: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    seeds = list(range(cases))
    while seeds:
        with multiprocessing.get_context("fork").Pool(workers, _start_worker, (str(pristine),)) as pool:
            pending = [(seed, pool.apply_async(_run_case, (kind, seed))) for seed in seeds]
            seeds = []
            for index, (seed, result) in enumerate(pending):
                try:
                    outcome, detail = result.get(timeout=timeout)
                except multiprocessing.TimeoutError:
                    outcome, detail = "hang", f"seed {seed} ran past {timeout} s"
                    seeds = [later for later, _ in pending[index + 1 :]]  # restart the pool for the rest
                    pool.terminate()
                counts[outcome] += 1
                if detail and outcome not in examples:
                    examples[outcome] = f"seed {seed}: {detail}"
                if outcome == "hang":
                    break
    return {"cases": cases, "outcomes": dict(counts), "first_example_per_finding": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-cases", type=int, default=5000)
    parser.add_argument("--weights-cases", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="lora-engine-campaign-") as scratch:
        pristine = Path(scratch) / "pristine"
        adapter_version(1).save_pretrained(pristine)
        as_peft_saved(pristine)
        for kind, cases in (("config", args.config_cases), ("weights", args.weights_cases)):
            start = time.perf_counter()
            report[kind] = run_mutations(kind, cases, pristine, args.workers, args.timeout)
            report[kind]["seconds"] = round(time.perf_counter() - start, 1)
        for adapter_name in ("default", "other"):
            for slow in (False, True):
                start = time.perf_counter()
                kills = args.kills // 2 + (args.kills % 2 if not slow else 0)
                root = Path(scratch) / f"kills-{adapter_name}-{slow}"
                counts = kill_during_saves(root, adapter_name, kills, seed=7, slow_renames=slow)
                counts["seconds"] = round(time.perf_counter() - start, 1)
                report[f"kills_{adapter_name}_{'slow_renames' if slow else 'disk'}"] = counts
    print(json.dumps(report, indent=2))
    bad = {"crash", "hang", "unnamed", "lost", "silent_wrong"}
    found = sum(report[kind]["outcomes"].get(outcome, 0) for kind in ("config", "weights") for outcome in bad)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
