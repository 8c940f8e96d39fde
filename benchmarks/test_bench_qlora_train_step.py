"""Benchmark: a tiny Llama's QLoRA training step (decoder linears in bitsandbytes NF4), ours vs peft. The workload
is lora_engine.bench.model_workloads.train_step with ``base="nf4"``."""

WORKLOAD = "qlora_train_step"


def test_qlora_train_step(case, impl, run_benchmark):
    run_benchmark(case, impl)
