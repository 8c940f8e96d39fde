"""The CPU 4-bit quantizer (``layers.bnb_quantize``) against bitsandbytes' own (``quantize_4bit``'s PyTorch kernel,
the one its CPU backend runs), bit for bit: NF4 and FP4, blocksizes, odd shapes with a partial last block and an odd
element count, fp32/fp16/bf16 inputs, zeros, subnormals, NaN/inf, values on and beside every midpoint; and the
4-bit layer's requantization (merges) against bnb's own, byte for byte, for every ``quant_storage``."""

import bitsandbytes as bnb
import pytest
import torch

from lora_engine.layers.bnb import LoraLinear4bit
from lora_engine.layers.bnb_quantize import quantize_4bit
from lora_engine.reference.nf4_dequantize import CODE_TABLES

QUANT_TYPES = ["nf4", "fp4"]
# (45, 29): an odd count (the last byte is half padding) and blocks across rows; (3, 5, 7): 3-D; (2, 4096): whole
# blocks of every size.
SHAPES = [(45, 29), (3, 5, 7), (2, 4096)]


def _bnb_quantize(weight, blocksize, quant_type):
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight, blocksize, quant_type, torch.uint8)
    return packed.view(-1), absmax


def _assert_same_as_bnb(weight, blocksize, quant_type):
    packed, absmax = quantize_4bit(weight, blocksize, quant_type)
    want_packed, want_absmax = _bnb_quantize(weight, blocksize, quant_type)
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert torch.equal(packed, want_packed), (
        f"{(packed != want_packed).sum()} of {packed.numel()} bytes differ"
    )
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32))  # same bits, NaN included


def _weight(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_same_bytes_and_absmax_as_bnb(quant_type, blocksize, shape, dtype):
    _assert_same_as_bnb(_weight(shape, dtype), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_blocks_subnormals_and_largest_values_match_bnb(quant_type):
    weight = _weight((9, 128))
    weight[0] = 0.0  # absmax 0: bnb divides by its clamp, 1e-38
    weight[1] *= 1e-40  # subnormal block
    weight[2, :3] = torch.finfo(torch.float32).max
    weight[3, ::2] = -0.0
    _assert_same_as_bnb(weight, 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_non_finite_values_get_bnb_indices(quant_type):
    weight = _weight((6, 96))
    weight[0, 5] = float("nan")
    weight[2, 7] = float("inf")
    weight[4, -1] = -float("inf")
    _assert_same_as_bnb(weight, 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_values_on_and_beside_every_midpoint_match_bnb(quant_type):
    # With a block absmax of 1 the scaled value is the value itself: each midpoint and its fp32 neighbours
    # exercise the grid's exact comparison, and the cell edges nearest to them.
    code = CODE_TABLES[quant_type]
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    near = [
        midpoints,
        torch.nextafter(midpoints, torch.tensor(2.0)),
        torch.nextafter(midpoints, torch.tensor(-2.0)),
    ]
    grid_edges = torch.arange(-1024, 1025) / 1024.0
    values = torch.cat([*near, grid_edges, torch.nextafter(grid_edges, torch.tensor(-2.0)), code])
    values = torch.cat([values, torch.zeros(-values.numel() % 63)]).view(-1, 63).clamp(-1, 1)
    weight = torch.cat([torch.ones(values.shape[0], 1), values], dim=1)  # each block of 64 starts with 1.0
    _assert_same_as_bnb(weight, 64, quant_type)


def test_leaves_its_input_untouched():
    weight = _weight((45, 29))
    before = weight.clone()
    quantize_4bit(weight, 64, "nf4")
    assert torch.equal(weight, before)


def _lora_4bit_layer(quant_type, double_quant, quant_storage):
    base = bnb.nn.Linear4bit(
        96, 40, compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage
    )
    base.weight.data = _weight((40, 96), seed=1)
    return LoraLinear4bit(base.to("cpu"))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_layer_requantizes_as_bnb_quantizes_a_new_weight(quant_type, double_quant, quant_storage):
    layer = _lora_4bit_layer(quant_type, double_quant, quant_storage)
    merged = _weight((40, 96), seed=2)
    layer._requantize(merged.clone())
    want = bnb.nn.Params4bit(
        merged, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=quant_storage,
    ).to("cpu")  # fmt: skip
    got = layer.base_layer.weight
    assert type(got) is bnb.nn.Params4bit and got.dtype == quant_storage and got.shape == want.shape
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    state, want_state = got.quant_state, want.quant_state
    assert layer.base_layer.quant_state is state and got.bnb_quantized and not got.requires_grad
    assert (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested) == (
        want_state.shape, want_state.dtype, want_state.blocksize, want_state.quant_type, want_state.nested,
    )  # fmt: skip
    assert torch.equal(state.absmax, want_state.absmax) and torch.equal(state.code, want_state.code)
    if double_quant:
        assert torch.equal(state.offset, want_state.offset)
        assert torch.equal(state.state2.absmax, want_state.state2.absmax)
        assert torch.equal(state.state2.code, want_state.state2.code)
        assert state.state2.blocksize == want_state.state2.blocksize
