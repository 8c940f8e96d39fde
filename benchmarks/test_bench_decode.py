"""Benchmark: small-batch decode; ours vs peft. The workload is lora_engine.bench. a LoRA layer's inference forward at 1-16 tokens, dense and NF4 bases:layer_workloads.lora_layer."""

WORKLOAD = "decode"


def test_decode(case, impl, run_benchmark):
    run_benchmark(case, impl)
