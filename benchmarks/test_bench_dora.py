"""Benchmark: DoRA linear forward + backward (grads for x, A, B and the magnitude); ours vs peft, at a shape where
peft's dense ``W + s·B A`` temporary matters. The workload is lora_engine.bench.layer_workloads.lora_layer with
``use_dora=True``."""

WORKLOAD = "dora_forward_backward"


def test_dora_forward_backward(case, impl, run_benchmark):
    run_benchmark(case, impl)
