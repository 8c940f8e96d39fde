"""Which cases the sweeps hold: the workloads issues 12, 13 and 17 ask the benchmark for."""

from lora_engine.bench import suite
from lora_engine.bench.shapes import SHAPES


def _sweep(device, mode, family, workload=None):
    return [
        case for case in suite.cases(device, mode, (family,)) if workload is None or case.workload == workload
    ]


def test_mixed_batches_reach_64_adapters_with_one_row_each_at_the_same_token_count():
    for device in ("cpu", "cuda"):
        cases = {case.params["adapters"]: case for case in _sweep(device, "quick", "mixed_batch")}
        assert set(cases) == {1, 4, 8, 16, 64}
        tokens = {case.params["batch"] * case.params["seq"] for case in cases.values()}
        assert len(tokens) == 1
        assert cases[64].params["batch"] == 64
        assert (
            cases[8].params["batch"] == SHAPES[(device, "quick")].mixed_batch
        )  # the target's case unchanged


def test_nf4_decode_runs_at_batch_1_4_and_16():
    for device in ("cpu", "cuda"):
        nf4 = [case for case in _sweep(device, "quick", "decode") if case.params["base"] == "nf4"]
        assert sorted(case.params["tokens"] for case in nf4) == [1, 4, 16]


def test_qlora_family_has_the_layer_both_ways_and_a_4bit_llama_training_step():
    for device in ("cpu", "cuda"):
        cases = _sweep(device, "quick", "qlora")
        assert {case.params.get("training") for case in cases if case.workload == "qlora"} == {False, True}
        steps = [case for case in cases if case.workload == "qlora_train_step"]
        assert steps and all(case.params["base"] == "nf4" for case in steps)


def test_live_memory_case_loads_100_adapters_untimed():
    for device in ("cpu", "cuda"):
        (case,) = _sweep(device, "quick", "memory")
        assert case.params["adapters"] == 100 and not case.timed


def test_mixed_batches_time_the_frozen_base_model_beside_ours_and_peft():
    for device in ("cpu", "cuda"):
        assert all(case.impls == ("ours", "peft", "base") for case in _sweep(device, "quick", "mixed_batch"))
