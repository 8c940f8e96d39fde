"""``lora-engine bench --smoke --interpret``: the code only a CUDA run reaches (the CUDA sweep's cases on the Triton
kernels, the roofline columns, the strategy ``auto`` chose, the CUDA targets) runs on CPU tensors under the
Triton interpreter. Run in a child process: triton decides compiled-or-interpreted when it is imported, and this
test process imported it compiled."""

import json
import os
import subprocess
import sys

import pytest

from lora_engine.bench import main


@pytest.fixture(scope="module")
def interpreted_run(tmp_path_factory):
    """``(printed table, JSON record)`` of one interpreted run of the dense layer and decode families."""
    out = tmp_path_factory.mktemp("interpreted")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LORA_ENGINE_")}
    environment["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_engine",
            "bench",
            "--smoke",
            "--interpret",
            "--only",
            "lora_linear,decode",
        ]
        + ["--out", str(out)],
        cwd=out,  # not the repository root, whose kernels/ folder would shadow Hugging Face's kernels package
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = out.glob("cpu-interpreted-*-smoke.json")
    return done.stdout, json.loads(json_path.read_text())


def test_layers_run_the_triton_kernels(interpreted_run):
    _, record = interpreted_run
    assert record["lora_engine_backend"] == "triton"
    assert record["context"]["sweep"] == "cuda (interpreted on the cpu)"
    assert {result["dtype"] for result in record["results"]} == {"bf16"}  # the CUDA sweep's precision


def test_every_case_has_a_roofline_beside_its_time_with_the_assumed_peaks_stated(interpreted_run):
    printed, record = interpreted_run
    assert "roofline peaks: 790 TFLOP/s bf16 dense GEMM, HBM 3.35 TB/s (assumed H100 figures" in printed
    header = next(line for line in printed.splitlines() if line.startswith("workload")).split()
    assert header.index("ours/peft") + 1 == header.index("roofline") == header.index("ours/roofline") - 1
    assert all(result["roofline_s"] > 0 for result in record["results"])


def test_dense_and_4bit_layer_cases_report_the_strategy_auto_ran(interpreted_run):
    _, record = interpreted_run
    strategy = {
        (result["case"], result["params"]["tokens"]): result["strategy"] for result in record["results"]
    }
    # Off CUDA nothing is timed: above 64 rows auto runs fused; at most 64 rows (decode) always cublas.
    assert strategy[("forward+backward", 72)] == "fused"
    assert strategy[("dense 64->64", 1)] == "cublas"
    assert strategy[("NF4 64->64", 1)] == "gemv"  # a 4-bit base at ≤ 64 rows: the fused dequantize-in-GEMV


def test_interpret_needs_the_interpreter_set_before_start(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--smoke", "--interpret"]) == 2
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err


def test_interpret_runs_only_tiny_shapes(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["--quick", "--interpret"]) == 2
    assert "only with --smoke" in capsys.readouterr().err
