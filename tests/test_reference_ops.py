"""The reference ops against the plain formulas they implement: forward, every gradient, dropout, merge."""

import pytest
import torch
import torch.nn.functional as F

from lora_engine.ops.lora_linear import lora_linear, reference_lora_linear
from lora_engine.ops.lora_merge import lora_merge
from lora_engine.reference import lora_linear as reference_math
from lora_engine.reference.lora_linear import keep_mask, pack_keep, unpack_keep

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _operands(dtype, leading=(2, 3), in_features=7, out_features=5, rank=3, bias=True):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    x = rand(*leading, in_features)
    weight = rand(out_features, in_features).detach()  # frozen
    bias_ = rand(out_features) if bias else None
    return (
        x,
        weight,
        bias_,
        rand(rank, in_features, dtype=torch.float32),
        rand(out_features, rank, dtype=torch.float32),
    )


def _plain(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """peft's computation: base(x) + B(A(dropout(x))) * s, summed in promoted dtype, cast back."""
    base = F.linear(x, weight, bias)
    x_lora = x.to(lora_A.dtype)
    if keep is not None:
        x_lora = x_lora * keep / (1 - p)
    return (base + (x_lora @ lora_A.T) @ lora_B.T * scaling).to(base.dtype)


def _grads(out, tensors):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_forward_and_gradients_match_the_formula(dtype, bias):
    x, weight, bias_, lora_A, lora_B = _operands(dtype, bias=bias)
    ours = lora_linear(x, weight, bias_, lora_A, lora_B, 0.7)
    plain = _plain(x, weight, bias_, lora_A, lora_B, 0.7)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, plain, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    for got, want in zip(_grads(ours, [x, bias_, lora_A, lora_B]), _grads(plain, [x, bias_, lora_A, lora_B])):
        torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_lora_linear_takes_non_contiguous_input():
    x, weight, bias, lora_A, lora_B = _operands(torch.float32, leading=(3, 4))
    x_t = x.detach().transpose(0, 1).requires_grad_()  # [4, 3, in], non-contiguous
    assert not x_t.is_contiguous()
    ours, plain = (
        lora_linear(x_t, weight, bias, lora_A, lora_B, 2.0),
        _plain(x_t, weight, bias, lora_A, lora_B, 2.0),
    )
    torch.testing.assert_close(ours, plain)
    for got, want in zip(_grads(ours, [x_t, lora_A, lora_B]), _grads(plain, [x_t, lora_A, lora_B])):
        torch.testing.assert_close(got, want)


def test_lora_linear_fan_in_fan_out_weight_is_in_out():
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    weight_in_out = weight.T.contiguous().requires_grad_()
    ours = lora_linear(x, weight_in_out, bias, lora_A, lora_B, 1.5, fan_in_fan_out=True)
    plain = _plain(x, weight_in_out.T, bias, lora_A, lora_B, 1.5)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(
        _grads(ours, [x, weight_in_out, lora_A, lora_B]), _grads(plain, [x, weight_in_out, lora_A, lora_B])
    ):
        torch.testing.assert_close(got, want)


def test_lora_linear_without_weight_returns_only_the_low_rank_term():
    x, _, _, lora_A, lora_B = _operands(torch.float32)
    torch.testing.assert_close(
        lora_linear(x, None, None, lora_A, lora_B, 3.0), (x @ lora_A.T) @ lora_B.T * 3.0
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_gradients_match_the_formula_fed_the_same_mask(p):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    seed = torch.tensor([1234])
    ours = reference_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, seed, False)
    keep = keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).view(x.shape)
    plain = _plain(x, weight, bias, lora_A, lora_B, 0.5, keep=keep, p=p)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(_grads(ours, [x, bias, lora_A, lora_B]), _grads(plain, [x, bias, lora_A, lora_B])):
        torch.testing.assert_close(got, want)


def test_dropout_passes_gradcheck_in_double():
    x, weight, bias, lora_A, lora_B = (
        t.detach().double().requires_grad_(t.requires_grad) for t in _operands(torch.float32, leading=(4,))
    )
    lora_A.requires_grad_(), lora_B.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *args: reference_lora_linear(*args, 0.8, 0.3, torch.tensor([99]), False),
        (x, weight, bias, lora_A, lora_B),
    )


def test_dropout_drops_at_the_requested_rate_and_rescales():
    x = torch.ones(200, 500)
    lora_A, lora_B = torch.eye(500)[:500], torch.eye(500)  # the low-rank path is the identity
    out = lora_linear(x, None, None, lora_A, lora_B, 1.0, dropout_p=0.25)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.01
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_dropout_masks_differ_between_calls():
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    first = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5)
    second = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5)
    assert not torch.equal(first, second)


def _lowbias32(value: int) -> int:
    """Chris Wellons' lowbias32, in plain Python integers: the hash the module docstring specifies."""
    value ^= value >> 16
    value = (value * 0x7FEB352D) & 0xFFFFFFFF
    value ^= value >> 15
    value = (value * 0x846CA68B) & 0xFFFFFFFF
    return value ^ (value >> 16)


def test_the_dropout_mask_is_the_documented_hash_of_seed_and_flat_index():
    seed, rows, width, p = 2**31 - 1, 3, 11, 0.4
    threshold = round(p * 2**24)
    want = [
        (_lowbias32((index + seed * 0x9E3779B9) & 0xFFFFFFFF) >> 8) >= threshold
        for index in range(rows * width)
    ]
    got = keep_mask(torch.tensor([seed]), rows, width, p)
    assert got.flatten().tolist() == want


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_dropout_mask_drops_at_the_requested_rate_with_no_structure(p):
    rows, width = 512, 1024  # one million draws
    keep = keep_mask(torch.tensor([12345]), rows, width, p)
    dropped = (~keep).double()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sigma
    # Every row, every column and every residue of the flat index mod 8 and mod 256 drops at the same rate.
    assert dropped.mean(1).std().item() < 1.5 * (p * (1 - p) / width) ** 0.5
    assert dropped.mean(0).std().item() < 1.5 * (p * (1 - p) / rows) ** 0.5
    for period in (8, 256):
        by_residue = dropped.view(-1, period).mean(0)
        assert (by_residue - p).abs().max().item() < 5 * (p * (1 - p) * period / keep.numel()) ** 0.5
    # Neighbours are uncorrelated: a drop next to a drop is as likely as any drop.
    flat = dropped.flatten()
    assert abs((flat[1:] * flat[:-1]).mean().item() - p * p) < 5 * p * (1 - p) / keep.numel() ** 0.5


def test_masks_of_consecutive_seeds_agree_only_as_independent_draws_would():
    p, rows, width = 0.25, 256, 512
    first, second = (keep_mask(torch.tensor([seed]), rows, width, p) for seed in (7, 8))
    agreement = (first == second).double().mean().item()
    assert abs(agreement - ((1 - p) ** 2 + p**2)) < 5 * (0.5 / first.numel()) ** 0.5


@pytest.mark.parametrize("width", [1, 8, 13])
def test_packing_keeps_one_bit_per_element_least_significant_first(width):
    keep = torch.rand(5, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_keep(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-width // 8))
    assert (packed[:, 0] & 1).bool().tolist() == keep[:, 0].tolist()
    assert torch.equal(unpack_keep(packed, width), keep)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn``."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def test_dropout_saves_no_dropped_copy_of_the_input():
    tokens, in_features, out_features, rank = 256, 128, 128, 4
    x = torch.randn(tokens, in_features, requires_grad=True)
    weight = torch.randn(out_features, in_features)
    lora_A = torch.randn(rank, in_features, requires_grad=True)
    lora_B = torch.randn(out_features, rank, requires_grad=True)
    ours = _saved_bytes(lambda: lora_linear(x, weight, None, lora_A, lora_B, 1.0, dropout_p=0.1))
    peft_like = _saved_bytes(
        lambda: F.linear(x, weight) + F.linear(F.linear(F.dropout(x, 0.1), lora_A), lora_B)
    )
    x_bytes = x.numel() * 4
    small = (weight.numel() + lora_A.numel() + lora_B.numel() + tokens * rank) * 4
    packed_mask = tokens * in_features // 8
    assert ours <= x_bytes + small + packed_mask
    assert peft_like >= 2 * x_bytes


def test_merge_adds_and_unmerge_subtracts_the_scaled_delta():
    weight = torch.randn(5, 7)
    original = weight.clone()
    lora_A, lora_B = torch.randn(3, 7), torch.randn(5, 3)
    lora_merge(weight, lora_A, lora_B, 0.5)
    torch.testing.assert_close(weight, original + 0.5 * lora_B @ lora_A)
    lora_merge(weight, lora_A, lora_B, 0.5, subtract=True)
    torch.testing.assert_close(weight, original)


def test_merge_with_fan_in_fan_out_adds_the_transposed_delta():
    weight = torch.randn(7, 5)  # [in, out]
    original = weight.clone()
    lora_A, lora_B = torch.randn(3, 7), torch.randn(5, 3)
    lora_merge(weight, lora_A, lora_B, 2.0, fan_in_fan_out=True)
    torch.testing.assert_close(weight, original + 2.0 * (lora_B @ lora_A).T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_computes_the_delta_in_fp32_and_adds_it_in_the_weight_dtype(dtype):
    weight = torch.randn(5, 7).to(dtype)
    original = weight.clone()
    lora_A, lora_B = torch.randn(3, 7), torch.randn(5, 3)
    lora_merge(weight, lora_A, lora_B, 1.0)
    assert weight.dtype == dtype
    torch.testing.assert_close(weight, original + (lora_B @ lora_A).to(dtype))


def test_checked_merge_refuses_nan_and_leaves_the_weight_untouched():
    weight = torch.randn(5, 7)
    original = weight.clone()
    lora_A, lora_B = torch.randn(3, 7), torch.randn(5, 3)
    lora_B[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        lora_merge(weight, lora_A, lora_B, 1.0, check_finite=True)
    assert torch.equal(weight, original)


@pytest.mark.parametrize(("rows", "width", "seed"), [(1, 1, 0), (3, 11, 2**31 - 1), (97, 1357, 42)])
def test_the_cpu_mask_is_the_device_mask_bit_for_bit(rows, width, seed):
    # 97 x 1357 spans two of the numpy hash's chunks, the second one partial.
    numpy_mask = keep_mask(torch.tensor([seed]), rows, width, 0.3)
    torch_mask = reference_math._keep_mask_torch(torch.tensor([seed]), rows, width, 0.3)
    assert numpy_mask.dtype == torch.bool and numpy_mask.shape == (rows, width)
    assert torch.equal(numpy_mask, torch_mask)


def test_the_mask_drops_everything_at_p_one_and_nothing_at_p_zero():
    assert not keep_mask(torch.tensor([5]), 4, 9, 1.0).any()
    assert keep_mask(torch.tensor([5]), 4, 9, 0.0).all()


@pytest.mark.parametrize("width", [1, 8, 13, 64])
def test_cpu_packing_is_the_device_packing(width):
    keep = torch.rand(6, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_keep(keep)
    assert torch.equal(packed, reference_math._pack_keep_torch(keep))
    assert torch.equal(unpack_keep(packed, width), reference_math._unpack_keep_torch(packed, width))


def test_unpacking_reads_a_row_strided_mask():
    keep = torch.rand(5, 20, generator=torch.Generator().manual_seed(1)) > 0.5
    padded = torch.zeros(5, 7, dtype=torch.uint8)
    padded[:, :3] = pack_keep(keep)
    assert torch.equal(unpack_keep(padded[:, :3], 20), keep)


def test_dropout_forward_saves_only_the_packed_mask_and_the_rank_product():
    x, weight, bias, lora_A, lora_B = (t.detach() for t in _operands(torch.float32))
    out, xa, bits = reference_math.forward(
        x, weight, bias, lora_A, lora_B, 0.5, 0.2, torch.tensor([9]), False
    )
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    assert bits.dtype == torch.uint8 and bits.shape == (rows, -(-width // 8)) and bits.is_contiguous()
    assert xa.shape == (*x.shape[:-1], lora_A.shape[0]) and xa.dtype == lora_A.dtype
    keep = keep_mask(torch.tensor([9]), rows, width, 0.2).view(x.shape)
    torch.testing.assert_close(xa, (x * keep / 0.8) @ lora_A.T)
