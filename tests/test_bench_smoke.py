"""The benchmark suite cannot rot: every workload runs once at tiny size for every implementation, its
memory counters work, and ``lora-engine bench`` writes its table, JSON and plots.

Figures are not checked (timing belongs to ``lora-engine bench``, never to a test). The peak-RSS child process is
not started here: its fork server imports torch, transformers and peft once more, seconds the unit suite does not
spend; ``lora-engine bench --smoke`` runs it.
"""

import json

import pytest
import torch
from torch import nn

from lora_engine.bench import builders, main, memory, shapes, suite
from lora_engine.bench.case import build_runner
from lora_engine.bench.measure import compare_outputs

CPU = torch.device("cpu")


def _one_case_per_line() -> list:
    """The first sweep point of every (family, label): every timed workload and variant, once (the untimed
    live-memory case has its own test)."""
    first = {}
    for case in suite.cases("cpu", "smoke"):
        if case.timed:
            first.setdefault((case.family, case.label), case)
    return list(first.values())


def _lora_saved_bytes(case) -> int:
    """What a LoRA forward must save for its backward, counted from the shapes: each adapted layer's input ``x``
    (for the gradient of ``A``; layers fed the same tensor share it) and ``x Aᵀ`` (for the gradient of ``B``);
    for DoRA also what its rescaling needs. Dropout adds each layer's own keep-mask, bit-packed: one bit per
    element of its input (``ceil(in/8)`` bytes per row), never a dropped copy."""
    params = case.params
    itemsize = params["dtype"].itemsize
    dropout = params.get("dropout", 0.0) > 0.0
    if case.workload in (
        "train_step",
        "qlora_train_step",
    ):  # all-linear: q/k/v share one input, gate/up another
        spec, tokens = params["spec"], params["batch"] * params["seq"]
        per_layer = (3 * spec.hidden + spec.intermediate + 7 * params["r"]) * itemsize
        if dropout:  # q, k, v, o, gate and up read hidden features, down the intermediate ones
            per_layer += 6 * -(-spec.hidden // 8) + -(-spec.intermediate // 8)
        return spec.layers * tokens * per_layer
    mask = -(-params["in_features"] // 8) if dropout else 0
    saved = params["tokens"] * ((params["in_features"] + params["r"]) * itemsize + mask)
    if params.get("use_dora"):
        # DoRA also keeps its unscaled output x Wᵀ + s·(x Aᵀ) Bᵀ (for the magnitude's gradient) and the fp32
        # [out] vectors m / norm and norm (the norm itself is detached; no [out, in] tensor is saved).
        saved += params["tokens"] * params["out_features"] * itemsize + 2 * params["out_features"] * 4
    return saved


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", _one_case_per_line(), ids=lambda case: f"{case.family}-{case.label}")
def test_workload_runs_once_for_every_implementation(case):
    outputs = {}
    for impl in case.impls:
        runner = build_runner(case, impl, CPU)
        if runner.reset is not None:
            runner.reset()
        outputs[impl] = runner.run()
        if runner.forward is not None:
            saved = memory.saved_tensor_bytes(runner.forward, runner.parameters, runner.saved_scope)
            if impl == "base":  # a frozen layer's backward needs only its weight, a parameter
                assert saved == 0
            elif impl == "ours":
                assert saved == _lora_saved_bytes(case)
            else:  # peft saves at least that; with dropout, also the dropped-out input
                assert saved >= _lora_saved_bytes(case) > 0
        runner.close()
    parity = compare_outputs(outputs["ours"], outputs["peft"], case.dtype) if case.deterministic else None
    assert parity is None or parity["ok"], parity


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", suite.cases("cuda", "smoke", ("train_step",)), ids=lambda case: case.label)
def test_cuda_training_step_runs_in_bf16_under_autocast(case):
    """The CUDA sweep's precision, run on the CPU: every LoRA layer has a bf16 base weight and fp32 factors, and
    under bf16 autocast returns bf16; the step's loss is finite."""
    for impl in case.impls:
        runner = build_runner(case, impl, CPU)
        lora_layers = runner.saved_scope
        output_dtypes = set()
        hooks = [
            layer.register_forward_hook(
                lambda _layer, _inputs, output, seen=output_dtypes: seen.add(output.dtype)
            )
            for layer in lora_layers
        ]
        loss = runner.run()
        for hook in hooks:
            hook.remove()
        factors = [
            param for layer in lora_layers for name, param in layer.named_parameters() if "lora_" in name
        ]
        assert lora_layers and factors
        assert {layer.base_layer.weight.dtype for layer in lora_layers} == {torch.bfloat16}, impl
        assert {factor.dtype for factor in factors} == {torch.float32}, impl
        assert output_dtypes == {torch.bfloat16}, impl
        assert torch.isfinite(loss), impl


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_live_memory_case_counts_the_base_and_every_adapter():
    (case,) = [case for case in suite.cases("cpu", "smoke", ("memory",))]
    for impl in case.impls:
        figures = build_runner(case, impl, CPU).run()
        adapters = case.params["adapters"]
        assert figures["base"] > 0 and figures["one_adapter"] > 0, impl
        assert figures["loaded"] - figures["base"] == adapters * figures["one_adapter"], impl


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ours_and_peft_get_identical_base_and_adapter_weights():
    spec = shapes.SHAPES[("cpu", "smoke")].llama
    models = {
        impl: builders.with_lora(
            impl, builders.llama(spec, torch.float32, CPU), adapters=2, target_modules="all-linear", r=4
        )
        for impl in ("ours", "peft")
    }
    ours, theirs = models["ours"].state_dict(), models["peft"].state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert any(".lora_B.a1." in key and theirs[key].abs().sum() > 0 for key in theirs)


def test_saved_bytes_count_each_storage_once_and_never_parameters():
    weight = nn.Parameter(torch.randn(8, 4))
    x = torch.randn(3, 4, requires_grad=True)

    def forward():
        # mul saves x twice (one storage, two views); matmul saves x again and the parameter.
        return (x * x[:, :]).sum() + (x @ weight.T).sum()

    assert memory.saved_tensor_bytes(forward, parameters=[weight]) == x.numel() * 4


def test_saved_bytes_scope_counts_only_inside_the_given_modules():
    inner, outer = nn.Linear(4, 4), nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)

    def forward():
        return inner(torch.tanh(outer(x)))  # tanh saves its output, outside ``inner``

    in_scope = memory.saved_tensor_bytes(
        forward, list(inner.parameters()) + list(outer.parameters()), [inner]
    )
    everything = memory.saved_tensor_bytes(forward, list(inner.parameters()) + list(outer.parameters()))
    assert 0 < in_scope < everything


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bench_command_writes_table_json_and_one_png_per_family(tmp_path, capsys):
    status = main(
        ["--smoke", "--device", "cpu", "--only", "lora_linear,merge", "--no-peak", "--out", str(tmp_path)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "ours/peft" in printed and "targets:" in printed
    (json_path,) = tmp_path.glob("cpu-*-smoke.json")
    record = json.loads(json_path.read_text())
    assert {"torch", "transformers", "peft", "bitsandbytes", "triton"} <= record["versions"].keys()
    assert record["device"]["name"] and "commit" in record["git"]
    assert {result["family"] for result in record["results"]} == {"lora_linear", "merge"}
    assert all({"median", "p20", "p80"} <= result["time_s"]["peft"].keys() for result in record["results"])
    assert sorted(path.name.split("-smoke-")[1] for path in tmp_path.glob("*.png")) == [
        "lora_linear.png",
        "merge.png",
    ]


def test_bench_without_peft_says_how_to_install_the_extra(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "peft" else real_find_spec(name, *args),
    )
    assert main(["--smoke"]) == 2
    assert 'pip install -e ".[bench]"' in capsys.readouterr().err
