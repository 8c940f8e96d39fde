"""Benchmark: mixed-adapter batches (adapter_names=, one adapter per row) with 1 to 16 adapters; ours vs peft. The workload is lora_engine.bench.model_workloads.mixed_batch."""

WORKLOAD = "mixed_batch"


def test_mixed_batch(case, impl, run_benchmark):
    run_benchmark(case, impl)
