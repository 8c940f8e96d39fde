"""The ops check their operands themselves: the same bad input raises the same error, naming the operand, on the
reference backend and on the Triton backend (under the interpreter), before any backend math runs."""

import re

import bitsandbytes.functional as bnb_F
import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine import backend
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.ops.lora_merge import lora_merge
from lora_engine.ops.nf4_lora_linear import nf4_lora_linear

pytestmark = pytest.mark.usefixtures("kernels")

ROWS, IN_FEATURES, OUT_FEATURES, RANK = 6, 10, 8, 3


def _linear_operands():
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(ROWS, IN_FEATURES, generator=generator),
        "weight": torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator),
        "bias": torch.randn(OUT_FEATURES, generator=generator),
        "lora_A": torch.randn(RANK, IN_FEATURES, generator=generator, requires_grad=True),
        "lora_B": torch.randn(OUT_FEATURES, RANK, generator=generator, requires_grad=True),
    }


def _error_on_each_backend(monkeypatch, run):
    """``{backend: (exception type, message)}`` of what ``run()`` raises on the reference and on Triton."""
    raised = {}
    for name in ("reference", "triton"):
        monkeypatch.setenv(backend.ENV_VAR, name)
        with pytest.raises((TypeError, ValueError)) as error:
            run()
        raised[name] = (error.type, str(error.value))
    return raised


LINEAR_CASES = {
    "x-width": (
        {"x": lambda x: x[:, :-1]},
        r"x \[..., 9\], lora_A \(3, 10\) and lora_B \(8, 3\) do not chain",
    ),
    "lora_B-rank": ({"lora_B": lambda b: b[:, :-1]}, r"lora_A \(3, 10\) and lora_B \(8, 2\) do not chain"),
    "lora_A-dims": ({"lora_A": lambda a: a[0]}, r"lora_A has shape \(10,\); expected \[r, in\]"),
    "weight-shape": ({"weight": lambda w: w[:-1]}, r"weight has shape \(7, 10\); expected \(8, 10\)"),
    "weight-dtype": (
        {"weight": lambda w: w.half()},
        "weight has dtype torch.float16 but x has torch.float32",
    ),
    "bias-shape": ({"bias": lambda b: b[:-1]}, r"bias has shape \(7,\); expected \(8,\)"),
    "bias-dtype": ({"bias": lambda b: b.bfloat16()}, "bias has dtype torch.bfloat16 but x has torch.float32"),
    "adapter-dtypes": (
        {"lora_B": lambda b: b.half()},
        r"lora_A \(torch.float32\) and lora_B \(torch.float16\)",
    ),
    "devices": ({"lora_A": lambda a: a.to("meta")}, "operands on different devices .*lora_A on meta"),
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_lora_linear_refuses_bad_operands_with_one_message_on_both_backends(monkeypatch, case):
    change, message = LINEAR_CASES[case]
    operands = _linear_operands()
    for name, transform in change.items():
        operands[name] = transform(operands[name].detach())
    raised = _error_on_each_backend(monkeypatch, lambda: lora_linear(*operands.values(), 0.5))
    (error_type, text), triton_raised = raised["reference"], raised["triton"]
    assert triton_raised == (error_type, text)
    assert text.startswith("lora_linear: ")
    assert re.search(message, text), text


def test_x_of_a_dtype_no_backend_computes_in_is_refused_by_both_naming_it(monkeypatch):
    operands = _linear_operands()
    operands["x"] = operands["x"].int()
    raised = _error_on_each_backend(monkeypatch, lambda: lora_linear(*operands.values(), 0.5))
    for (
        error_type,
        text,
    ) in raised.values():  # the dtypes each backend lists differ: float64 is reference-only
        assert error_type is TypeError and text.startswith(
            "lora_linear: x has dtype torch.int32; expected one of"
        )


def test_float64_runs_on_the_reference_and_is_refused_by_triton_naming_the_dtype(monkeypatch):
    operands = {name: tensor.detach().double() for name, tensor in _linear_operands().items()}
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert lora_linear(*operands.values(), 0.5).dtype == torch.float64
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(
        TypeError, match="lora_linear: x has dtype torch.float64; expected one of torch.float32"
    ):
        lora_linear(*operands.values(), 0.5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_lora_merge_refuses_mismatched_shapes_with_one_message_on_both_backends(monkeypatch, fan_in_fan_out):
    weight = torch.randn(OUT_FEATURES, IN_FEATURES + 1)
    if fan_in_fan_out:
        weight = weight.T.contiguous()
    original = weight.clone()
    lora_A, lora_B = torch.randn(RANK, IN_FEATURES), torch.randn(OUT_FEATURES, RANK)
    raised = _error_on_each_backend(
        monkeypatch, lambda: lora_merge(weight, lora_A, lora_B, 1.0, fan_in_fan_out=fan_in_fan_out)
    )
    assert raised["triton"] == raised["reference"]
    assert raised["reference"][1].startswith(f"lora_merge: weight {tuple(weight.shape)}")
    assert torch.equal(weight, original)


def _nf4_linear_operands():
    """x, packed, quant_state (NF4, double quant, blocksize 32), bias, lora_A, lora_B."""
    operands = _linear_operands()
    packed, quant_state = bnb_F.quantize_4bit(operands.pop("weight"), blocksize=32)
    x, bias, lora_A, lora_B = operands.values()
    return {
        "x": x,
        "packed": packed,
        "quant_state": quant_state,
        "bias": bias,
        "lora_A": lora_A,
        "lora_B": lora_B,
    }


NF4_LINEAR_CASES = {
    "x-width": ({"x": lambda x: x[:, :-1]}, r"x has shape \(6, 9\); expected \[..., 10\]"),
    "lora_B-out": (
        {"lora_B": lambda b: b[:-1]},
        r"lora_A \(3, 10\) and lora_B \(7, 3\) do not fit the weight \(8, 10\)",
    ),
    "bias-shape": ({"bias": lambda b: b[:-1]}, r"bias has shape \(7,\); expected \(8,\)"),
    "bias-dtype": ({"bias": lambda b: b.bfloat16()}, "bias has dtype torch.bfloat16 but x has torch.float32"),
    "devices": ({"lora_A": lambda a: a.to("meta")}, "operands on different devices .*lora_A on meta"),
}


@pytest.mark.parametrize("case", NF4_LINEAR_CASES)
def test_nf4_lora_linear_refuses_bad_operands_with_one_message_on_both_backends(monkeypatch, case):
    change, message = NF4_LINEAR_CASES[case]
    operands = _nf4_linear_operands()
    for name, transform in change.items():
        operands[name] = transform(operands[name].detach())
    raised = _error_on_each_backend(monkeypatch, lambda: nf4_lora_linear(*operands.values(), 0.5))
    (error_type, text), triton_raised = raised["reference"], raised["triton"]
    assert triton_raised == (error_type, text)
    assert text.startswith("nf4_lora_linear: ")
    assert re.search(message, text), text
