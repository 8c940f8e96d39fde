"""Benchmark: adapter switch (set_adapter) and load (load_adapter) time against the number of adapters loaded (huggingface/peft#981); ours vs peft. The workload is lora_engine.bench.model_workloads.adapter_switch / adapter_load."""

WORKLOAD = "adapters"


def test_adapters(case, impl, run_benchmark):
    run_benchmark(case, impl)
