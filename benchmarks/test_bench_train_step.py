"""Benchmark: a whole-model training step (loss, backward, AdamW) of a Llama with LoRA on every linear layer; ours vs peft. The workload is lora_engine.bench.model_workloads.train_step."""

WORKLOAD = "train_step"


def test_train_step(case, impl, run_benchmark):
    run_benchmark(case, impl)
