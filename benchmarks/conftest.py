"""pytest-benchmark suite: one file per workload, each case run for lora_engine ("ours") and peft.

The workloads, shapes and models are ``lora_engine.bench``'s, so these files and ``lora-engine bench`` measure
the same thing; ``lora-engine bench`` adds interleaving, memory figures, targets and plots. Each benchmark group
holds one case's implementations side by side.

    .venv/bin/pytest benchmarks/ --benchmark-only                       # CPU, quick shapes
    .venv/bin/pytest benchmarks/ --benchmark-only --bench-device cuda --bench-mode full
"""

import pytest
import torch

from lora_engine.bench import memory, suite
from lora_engine.bench.case import build_runner
from lora_engine.bench.timing import synchronizer

WARMUP_CALLS = 2
#: Timed rounds of a runner that needs an untimed reset before each call (pytest-benchmark cannot calibrate it).
RESET_ROUNDS = 20


def pytest_addoption(parser):
    group = parser.getgroup("lora_engine benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on")
    group.addoption("--bench-mode", choices=suite.MODES, default="quick", help="the sizes to sweep")


def pytest_generate_tests(metafunc):
    """Parametrize each file's test over the cases of its ``WORKLOAD`` and their implementations."""
    if "case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device")
    mode = metafunc.config.getoption("--bench-mode")
    cases = [case for case in suite.cases(device, mode) if case.workload == metafunc.module.WORKLOAD]
    metafunc.parametrize(
        ("case", "impl"),
        [
            pytest.param(case, impl, id=f"{impl}-{case.label}-{case.shape}")
            for case in cases
            for impl in case.impls
        ],
    )


@pytest.fixture
def device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return torch.device(name)


@pytest.fixture
def run_benchmark(benchmark, device):
    """``run_benchmark(case, impl)``: benchmark one implementation of one case, warm-up excluded."""

    def run(case, impl):
        runner = build_runner(case, impl, device)
        sync = synchronizer(device)

        def call():
            runner.run()
            sync()

        benchmark.group = f"{case.name} | {case.shape} | {case.dtype}"
        benchmark.extra_info.update(impl=impl, case=case.key)
        if runner.forward is not None:
            benchmark.extra_info["saved_bytes"] = memory.saved_tensor_bytes(
                runner.forward, runner.parameters, runner.saved_scope
            )
        try:
            if runner.reset is not None:
                benchmark.pedantic(call, setup=runner.reset, rounds=RESET_ROUNDS, warmup_rounds=WARMUP_CALLS)
            else:
                for _ in range(WARMUP_CALLS):
                    call()
                benchmark(call)
        finally:
            runner.close()

    return run
