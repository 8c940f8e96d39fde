"""LORA_ENGINE_BACKEND: the setting, its validation, and never a silent fallback."""

import pytest
import torch

import lora_engine
from lora_engine import backend
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.ops.lora_merge import lora_merge


@pytest.fixture(autouse=True)
def _no_override():
    backend.set_backend(None)
    yield
    backend.set_backend(None)


def test_default_backend_is_auto(monkeypatch):
    monkeypatch.delenv("LORA_ENGINE_BACKEND", raising=False)
    assert lora_engine.get_backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "triton", "reference"])
def test_environment_variable_sets_the_backend(monkeypatch, name):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", name)
    assert lora_engine.get_backend() == name


def test_set_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    lora_engine.set_backend("reference")
    assert lora_engine.get_backend() == "reference"
    lora_engine.set_backend(None)
    assert lora_engine.get_backend() == "triton"


def test_unknown_backend_in_environment_names_the_value(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LORA_ENGINE_BACKEND='cuda-magic'"):
        lora_engine.get_backend()


def test_unknown_backend_in_set_backend_names_the_value():
    with pytest.raises(ValueError, match="'fast'"):
        lora_engine.set_backend("fast")


def _linear_args():
    x = torch.randn(3, 5)
    return x, torch.randn(4, 5), None, torch.randn(2, 5), torch.randn(4, 2), 0.5


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "auto")
    x, weight, bias, lora_A, lora_B, scaling = _linear_args()
    out = lora_linear(x, weight, bias, lora_A, lora_B, scaling)
    torch.testing.assert_close(out, x @ weight.T + scaling * (x @ lora_A.T) @ lora_B.T)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_triton_for_an_op_without_a_kernel_raises_naming_the_op(monkeypatch, interpret):
    # Every op has a kernel today; an op added without one calls require_reference first.
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(RuntimeError, match="'new_op' has no Triton kernel"):
        backend.require_reference("new_op")


@pytest.mark.parametrize("name", ["auto", "reference"])
def test_an_op_without_a_kernel_may_run_the_reference_under_auto_and_reference(monkeypatch, name):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a kernel could run here, if the op had one
    backend.require_reference("new_op")  # returns: the op goes on with its reference


@pytest.mark.parametrize("run_op", [lambda: lora_linear(*_linear_args()), lambda: lora_merge(*_merge_args())])
def test_triton_for_cpu_tensors_without_the_interpreter_raises_instead_of_falling_back(monkeypatch, run_op):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_op()


def _merge_args():
    return torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2), 1.0


def test_triton_on_cpu_tensors_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.uses_triton("some_op", torch.device("cpu"))


def test_triton_with_the_interpreter_runs_an_existing_kernel(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.uses_triton("some_op", torch.device("cpu"))


def test_reference_never_uses_triton(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    assert not backend.uses_triton("some_op", torch.device("cpu"))
