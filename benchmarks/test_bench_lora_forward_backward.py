"""Benchmark: LoRA linear forward + backward (grads for x, A, B; also with dropout, and the frozen base layer alone as "base"); ours vs peft. The workload is lora_engine.bench.layer_workloads.lora_layer."""

WORKLOAD = "lora_forward_backward"


def test_lora_forward_backward(case, impl, run_benchmark):
    run_benchmark(case, impl)
