"""Benchmark: merge_adapter + unmerge_adapter on one layer, dense and NF4 (dequantize, add, requantize); ours vs peft. The workload is lora_engine.bench.layer_workloads.merge."""

WORKLOAD = "merge"


def test_merge(case, impl, run_benchmark):
    run_benchmark(case, impl)
