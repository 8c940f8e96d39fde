"""The frozen base layer's products through oneDNN (``reference.cpu_linear``) give what ``F.linear`` gives."""

import pytest
import torch
import torch.nn.functional as F

from lora_engine.reference import cpu_linear


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_onednn_is_available_in_this_torch_build():
    """The CPU wheels we ship against carry oneDNN; without it every product below would silently be MKL's."""
    assert cpu_linear._ONEDNN_LINEAR is not None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_linear_and_its_input_gradient_match_f_linear(bias, transposed_weight):
    """``transposed_weight``: a Conv1D's ``[in, out]`` weight passed as its transposed view."""
    weight = _randn(96, 80, seed=1).T if transposed_weight else _randn(80, 96, seed=1)
    bias_ = _randn(80, seed=2) if bias else None
    x = _randn(33, 96).requires_grad_()
    out = cpu_linear.linear(x, weight, bias_)
    want = F.linear(x, weight, bias_)
    torch.testing.assert_close(out, want)
    grad_out = _randn(33, 80, seed=3)
    (got_grad,) = torch.autograd.grad(out, x, grad_out)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    torch.testing.assert_close(got_grad, want_grad)


def test_a_frozen_weight_under_autograd_runs_the_onednn_function():
    x = _randn(8, 16).requires_grad_()
    out = cpu_linear.linear(x, _randn(12, 16, seed=1), _randn(12, seed=2))
    assert "FrozenLinear" in type(out.grad_fn).__name__


def test_a_weight_and_bias_that_require_grad_get_their_gradients():
    weight, bias = _randn(12, 16, seed=1).requires_grad_(), _randn(12, seed=2).requires_grad_()
    x = _randn(8, 16).requires_grad_()
    grad_out = _randn(8, 12, seed=3)
    got = torch.autograd.grad(cpu_linear.linear(x, weight, bias), [x, weight, bias], grad_out)
    want = torch.autograd.grad(F.linear(x, weight, bias), [x, weight, bias], grad_out)
    for got_grad, want_grad in zip(got, want, strict=True):
        torch.testing.assert_close(got_grad, want_grad)


def test_under_cpu_autocast_it_computes_in_the_autocast_dtype_as_f_linear_does():
    x, weight = _randn(8, 16), _randn(12, 16, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = cpu_linear.linear(x, weight, None), F.linear(x, weight)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_go_through_f_linear_unchanged(dtype):
    x, weight = _randn(8, 16).to(dtype), _randn(12, 16, seed=1).to(dtype)
    assert torch.equal(cpu_linear.linear(x, weight, None), F.linear(x, weight))


def test_no_rows_give_an_empty_output():
    assert cpu_linear.linear(torch.empty(0, 16), _randn(12, 16), None).shape == (0, 12)
