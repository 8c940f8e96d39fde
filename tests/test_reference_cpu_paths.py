"""The reference backend's CPU shortcuts give what peft's layer and the plain formula give.

Without dropout the reference adds the low-rank term into the base output with one ``addmm_`` (``alpha = s``), and
with a few fp32 rows and no autograd (decoding) it computes the base product as ``W @ xᵀ``; the dropout path scales
the small products instead of the ``[N, out]`` gradient. Each shortcut, and each case that must not take it (a
0-d tensor scaling, autocast, adapters in another dtype), is checked here against peft or the formula.
"""

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_engine
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.reference.lora_linear import SKINNY_MIN_WEIGHT, SKINNY_ROWS, base_output, input_grad

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class _Block(nn.Module):
    def __init__(self, in_features, out_features, bias):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _layer_pair(in_features=48, out_features=40, bias=True, dropout=0.0, dtype=torch.float32):
    """peft's and our LoRA layer on identical bases, with identical non-zero factors (r 8, alpha 24)."""
    layers = []
    for api in (peft, lora_engine):
        torch.manual_seed(0)
        block = _Block(in_features, out_features, bias).to(dtype)
        config = api.LoraConfig(
            target_modules=["proj"], r=8, lora_alpha=24, lora_dropout=dropout, init_lora_weights=False
        )
        layers.append(api.get_peft_model(block, config, autocast_adapter_dtype=False).base_model.model.proj)
    theirs, ours = layers
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
    return theirs, ours


def _input(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()


def _forward_and_grads(layer, x):
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return (out, *torch.autograd.grad(out, [x, *params], grad_out))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_without_dropout_matches_peft_in_output_and_every_gradient(bias, dtype):
    theirs, ours = _layer_pair(bias=bias, dtype=dtype)
    x = _input(2, 5, 48, dtype=dtype)
    for got, want in zip(_forward_and_grads(ours, x), _forward_and_grads(theirs, x), strict=True):
        assert got.dtype == want.dtype
        # bf16 rounds each product: both sides sit ~0.5% of the largest entry from the exact values (fp64), apart.
        atol = TOLERANCE[dtype] * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=atol, rtol=TOLERANCE[dtype])


def test_layer_without_dropout_matches_peft_on_a_non_contiguous_input():
    theirs, ours = _layer_pair()
    x = _input(5, 3, 48).detach().transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    for got, want in zip(_forward_and_grads(ours, x), _forward_and_grads(theirs, x), strict=True):
        torch.testing.assert_close(got, want)


def test_layer_with_dropout_and_the_mask_fixed_matches_peft_fed_the_same_mask(monkeypatch):
    """p > 0 (the autograd Function, which scales the [N, r] and [out, r] products): our layer with its mask
    equals peft's layer whose dropout applies that same mask."""
    theirs, ours = _layer_pair(dropout=0.25)
    x = _input(6, 48)
    seed = torch.tensor([1234])
    monkeypatch.setattr("lora_engine.ops.lora_linear.draw_seed", lambda device: seed)
    from lora_engine.reference.lora_linear import keep_mask

    keep = keep_mask(seed, 6, 48, 0.25)
    theirs.lora_dropout["default"] = _FixedMaskDropout(keep, 0.25)
    for got, want in zip(_forward_and_grads(ours, x), _forward_and_grads(theirs, x), strict=True):
        torch.testing.assert_close(got, want)


class _FixedMaskDropout(nn.Module):
    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep / (1 - self.p)


@pytest.mark.parametrize("rows", range(1, SKINNY_ROWS + 1))
@pytest.mark.parametrize("bias", [True, False])
def test_a_few_rows_without_autograd_match_f_linear_and_come_out_contiguous(rows, bias):
    """Decoding's shape: the base product as ``W @ xᵀ`` on a weight large enough to take that path."""
    weight = torch.randn(512, 512) / 512**0.5
    assert weight.numel() >= SKINNY_MIN_WEIGHT
    bias_ = torch.randn(512) if bias else None
    x = torch.randn(rows, 512)
    with torch.no_grad():
        out = base_output(x, weight, bias_, fan_in_fan_out=False)
    assert out.is_contiguous() and out.shape == (rows, 512)
    torch.testing.assert_close(out, F.linear(x, weight, bias_))


def test_a_decoding_layer_matches_peft_for_one_to_many_rows():
    theirs, ours = _layer_pair(in_features=512, out_features=512)
    theirs.eval(), ours.eval()
    for rows in (1, SKINNY_ROWS, SKINNY_ROWS + 1):
        x = torch.randn(rows, 1, 512)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))


def test_a_decoding_layer_with_adapters_disabled_returns_the_base_layer_output_exactly():
    _, ours = _layer_pair(in_features=512, out_features=512)
    ours.enable_adapters(False)
    x = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.equal(ours(x), ours.base_layer(x))


def test_a_tensor_scaling_gives_what_the_same_float_gives():
    """After ``prepare_model_for_compiled_hotswap`` the scaling is a 0-d tensor: added out of place, same values."""
    x, weight, bias = _input(3, 16), torch.randn(12, 16), torch.randn(12)
    lora_A, lora_B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    as_float = lora_linear(x, weight, bias, lora_A, lora_B, 0.75)
    as_tensor = lora_linear(x, weight, bias, lora_A, lora_B, torch.tensor(0.75))
    torch.testing.assert_close(as_tensor, as_float)
    grads = [torch.autograd.grad(out.sum(), [x, lora_A, lora_B]) for out in (as_float, as_tensor)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_under_cpu_autocast_the_sum_is_computed_as_autocast_computes_the_formula():
    x, weight, bias = _input(3, 16), torch.randn(12, 16), torch.randn(12)
    lora_A, lora_B = torch.randn(4, 16), torch.randn(12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
        plain = F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * 0.5
    assert ours.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(ours, plain, atol=3e-2, rtol=3e-2)


def test_the_input_and_the_base_weight_are_not_mutated():
    x, weight, bias = _input(4, 16), torch.randn(12, 16), torch.randn(12)
    before = [t.detach().clone() for t in (x, weight, bias)]
    lora_linear(x, weight, bias, torch.randn(4, 16), torch.randn(12, 4), 2.0).sum().backward()
    for tensor, copy in zip((x, weight, bias), before, strict=True):
        assert torch.equal(tensor.detach(), copy)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, None])
def test_the_input_gradient_is_the_base_term_plus_the_masked_low_rank_one_rounded_once(
    with_mask, weight_dtype
):
    """Backward's ``dx = dy W + (dxa A) · keep`` in the weight's dtype (``None``: no base weight, the low-rank
    term alone in the adapters' fp32); a bf16 base term gets the fp32 low-rank term rounded in once."""
    generator = torch.Generator().manual_seed(0)
    grad_rows = torch.randn(9, 24, generator=generator)
    weight = torch.randn(24, 40, generator=generator)
    grad_xa, lora_A = torch.randn(9, 4, generator=generator), torch.randn(4, 40, generator=generator)
    keep = (torch.rand(9, 40, generator=generator) > 0.3).to(torch.uint8) if with_mask else None
    low_rank = grad_xa @ lora_A * (keep if with_mask else 1)
    if weight_dtype is None:
        got, want = input_grad(grad_rows, None, grad_xa, lora_A, keep), low_rank
    else:
        grad_rows, weight = grad_rows.to(weight_dtype), weight.to(weight_dtype)
        got = input_grad(grad_rows, weight, grad_xa, lora_A, keep)
        want = ((grad_rows @ weight).float() + low_rank).to(weight_dtype)
    assert got.dtype == want.dtype
    exact = weight_dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
