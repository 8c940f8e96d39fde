"""Benchmark: QLoRA, LoRA on a bitsandbytes NF4 layer, forward and forward + backward; ours vs peft. The workload
is lora_engine.bench.layer_workloads.lora_layer."""

WORKLOAD = "qlora"


def test_qlora(case, impl, run_benchmark):
    run_benchmark(case, impl)
