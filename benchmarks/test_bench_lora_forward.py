"""Benchmark: LoRA linear forward (inference, no_grad) on x [tokens, in]; ours vs peft. The workload is lora_engine.bench.layer_workloads.lora_layer."""

WORKLOAD = "lora_forward"


def test_lora_forward(case, impl, run_benchmark):
    run_benchmark(case, impl)
