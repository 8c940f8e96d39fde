"""``reference.nf4_quantize`` emulates bitsandbytes' CUDA 4-bit quantizer: its vectorised threshold counts give the
index of bnb's decision trees (``dQuantizeNF4`` / ``dQuantizeFP4`` in csrc/kernels.cu, transcribed below with
the literals as written there) on and next to every threshold, where a nearest-code rule (bnb's pure-PyTorch
``bucketize``) rounds otherwise; subnormals are flushed, an all-zero block scales to NaN, and the padding nibble
is quantized like a 0. The emulation against bnb's CUDA kernel itself runs on a GPU
(``tests/kernel_ops/test_nf4_merge_cuda_rule.py``)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from bitsandbytes import functional as bnb_F

from lora_engine.reference.nf4_quantize import FP4_THRESHOLDS, NF4_THRESHOLDS, quantize_4bit_cuda

SUBNORMAL = float(np.float32(1e-40))


def _fp32(literal: str) -> np.float32:
    """The C literal ``literal``f as nvcc reads it: the decimal rounded once to the nearest fp32."""
    exact = Fraction(literal)
    guess = np.float32(float(exact))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    return min(candidates, key=lambda value: abs(Fraction(float(value)) - exact))


def _nf4_tree(x: np.float32) -> int:
    """dQuantizeNF4, as bnb's kernels.cu writes it."""
    if x > _fp32("0.03979014977812767"):
        if x > _fp32("0.3893125355243683"):
            if x > _fp32("0.6427869200706482"):
                return 0b1111 if x > _fp32("0.8614784181118011") else 0b1110
            return 0b1101 if x > _fp32("0.5016634166240692") else 0b1100
        if x > _fp32("0.2035212516784668"):
            return 0b1011 if x > _fp32("0.2920137718319893") else 0b1010
        return 0b1001 if x > _fp32("0.1202552504837513") else 0b1000
    if x > _fp32("-0.33967943489551544"):
        if x > _fp32("-0.13791173323988914"):
            return 0b0111 if x > _fp32("-0.045525018125772476") else 0b0110
        return 0b0101 if x > _fp32("-0.23460740596055984") else 0b0100
    if x > _fp32("-0.6106329262256622"):
        return 0b0011 if x > _fp32("-0.4599952697753906") else 0b0010
    return 0b0001 if x > _fp32("-0.8480964004993439") else 0b0000


def _fp4_tree(x: np.float32) -> int:
    """dQuantizeFP4, as bnb's kernels.cu writes it."""
    sign = 0b1000 if x < 0 else 0b0000
    x = abs(x)
    if x > _fp32("0.29166667"):
        if x > _fp32("0.583333"):
            return (0b0011 if x > _fp32("0.8333333") else 0b0010) + sign
        return (0b101 if x > _fp32("0.4166667") else 0b100) + sign
    if x > _fp32("0.0859375"):
        return (0b0111 if x > _fp32("0.20833333") else 0b0110) + sign
    return (0b0001 if x > _fp32("0.00260417") else 0b0000) + sign


TREES = {"nf4": _nf4_tree, "fp4": _fp4_tree}


def _near_thresholds(quant_type: str) -> torch.Tensor:
    """Every threshold (both signs for FP4's magnitudes), two fp32 steps either side, and the codes' own values."""
    thresholds = NF4_THRESHOLDS if quant_type == "nf4" else torch.cat([FP4_THRESHOLDS, -FP4_THRESHOLDS])
    values = [thresholds]
    for direction in (float("inf"), float("-inf")):
        step = thresholds
        for _ in range(2):
            step = torch.nextafter(step, torch.tensor(direction))
            values.append(step)
    values.append(bnb_F.get_4bit_type(quant_type, device="cpu").float())
    return torch.cat(values)


def _indices(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()


def _unit_blocks(values: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``values`` in blocks of ``blocksize - 1``, each led by a 1.0: every block's absmax is 1, its reciprocal
    exactly 1, so each value is quantized as itself."""
    rows = -(-values.numel() // (blocksize - 1))
    body = torch.nn.functional.pad(values, (0, rows * (blocksize - 1) - values.numel())).view(rows, -1)
    return torch.cat([torch.ones(rows, 1), body], dim=1).reshape(-1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_indices_on_and_next_to_every_threshold_are_the_cuda_trees(quant_type):
    values = _unit_blocks(_near_thresholds(quant_type))
    packed, absmax = quantize_4bit_cuda(values, 64, quant_type)
    want = [TREES[quant_type](np.float32(value)) for value in values.tolist()]
    assert torch.equal(_indices(packed), torch.tensor(want)) and torch.equal(absmax, torch.ones_like(absmax))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_cuda_rule_and_bnb_pytorch_rule_disagree_next_to_thresholds(quant_type):
    # Why the CUDA rule needs its own emulation: bnb's CPU quantize_4bit (nearest code by midpoints) rounds some
    # of these values to another index than the CUDA tree does.
    values = _unit_blocks(_near_thresholds(quant_type))
    cuda_packed, _ = quantize_4bit_cuda(values, 64, quant_type)
    torch_packed, _ = bnb_F.quantize_4bit(values.view(1, -1), blocksize=64, quant_type=quant_type)
    assert not torch.equal(cuda_packed, torch_packed.reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_random_values_in_any_block_take_the_tree_of_their_scaled_value(quant_type):
    values = 3 * torch.randn(1000, generator=torch.Generator().manual_seed(0))  # 16 blocks, the last partial
    packed, absmax = quantize_4bit_cuda(values, 64, quant_type)
    padded = torch.nn.functional.pad(values, (0, 1024 - 1000)).view(16, 64)
    assert torch.equal(absmax, padded.abs().amax(1))
    scaled = (padded * (1.0 / absmax).unsqueeze(1)).reshape(-1)[:1000]  # fp32, each product rounded once
    want = [TREES[quant_type](np.float32(value)) for value in scaled.tolist()]
    assert torch.equal(_indices(packed)[:1000], torch.tensor(want))


def test_an_odd_count_pads_the_last_byte_with_the_index_of_zero():
    values = torch.tensor([1.0, -0.5, 0.25])
    nf4, _ = quantize_4bit_cuda(values, 64, "nf4")
    fp4, _ = quantize_4bit_cuda(values, 64, "fp4")
    assert nf4.tolist() == [
        (15 << 4) | _nf4_tree(np.float32(-0.5)),
        (_nf4_tree(np.float32(0.25)) << 4) | 0b0111,
    ]
    assert fp4.tolist() == [(0b0011 << 4) | 0b1101, (0b0111 << 4) | 0b0000]


@pytest.mark.parametrize(("quant_type", "index"), [("nf4", 0b0000), ("fp4", 0b0000)])
def test_an_all_zero_block_scales_to_nan_and_takes_index_zero(quant_type, index):
    # absmax 0: 1.0f / 0 is inf and 0 * inf NaN, which fails every `x > t` (bnb does not clamp the absmax).
    values = torch.cat([torch.ones(64), torch.zeros(64), torch.zeros(3)])  # and a partial all-zero block
    packed, absmax = quantize_4bit_cuda(values, 64, quant_type)
    assert absmax.tolist() == [1.0, 0.0, 0.0]
    assert _indices(packed)[64:].tolist() == [index] * 68  # the padding nibble too


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_subnormals_are_flushed_to_zero_before_the_absmax_and_after_scaling(quant_type):
    subnormal_block = torch.tensor([SUBNORMAL, -SUBNORMAL]).repeat(32)  # flushed: an all-zero block
    tiny_in_unit_block = torch.cat([torch.ones(1), torch.full((63,), -SUBNORMAL)])  # -0 < 0 is false: no sign
    # The smallest normal over an absmax of 4 scales to a subnormal, flushed as well.
    scaled_to_subnormal = torch.cat(
        [torch.full((1,), 4.0), torch.full((63,), -torch.finfo(torch.float32).tiny)]
    )
    values = torch.cat([subnormal_block, tiny_in_unit_block, scaled_to_subnormal])
    packed, absmax = quantize_4bit_cuda(values, 64, quant_type)
    assert absmax.tolist() == [0.0, 1.0, 4.0]
    zero, one = TREES[quant_type](np.float32(0.0)), TREES[quant_type](np.float32(1.0))
    assert _indices(packed).tolist() == [0] * 64 + ([one] + [zero] * 63) * 2


def test_an_unknown_quant_type_is_refused_naming_it():
    with pytest.raises(ValueError, match="quant_type is 'int4'; expected 'nf4' or 'fp4'"):
        quantize_4bit_cuda(torch.ones(4), 64, "int4")
