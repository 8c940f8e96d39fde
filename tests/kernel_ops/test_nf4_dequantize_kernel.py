"""The Triton ``nf4_dequantize`` (under the interpreter) is bit-exact with bitsandbytes' ``dequantize_4bit`` and with
the reference: NF4 and FP4, with and without double quant, every blocksize bnb accepts (partial last blocks, blocks
across rows), fp32/fp16/bf16, other storage dtypes; and it fills a caller's buffer."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops import nf4_dequantize as dequantize_op
from lora_engine.reference.nf4_dequantize import nf4_dequantize as reference_dequantize

pytestmark = pytest.mark.usefixtures("kernels")

SHAPE = (33, 131)  # odd: blocks cross rows, the last block is partial, the last byte holds one element
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _quantized(
    dtype, blocksize=64, double_quant=True, quant_type="nf4", quant_storage=torch.uint8, shape=SHAPE
):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[::5] = 0.0  # zeros: FP4's signed zero index must come out as the reference's +0.0
    return bnb_F.quantize_4bit(
        weight,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )


def _assert_exact(packed, state):
    """Bit for bit equal to the reference (sign of zero included); equal in value (``torch.equal``) to bnb, whose
    CPU decodes disagree among themselves on the sign of FP4's zero."""
    ours = dequantize_op.nf4_dequantize(packed, state)
    reference = reference_dequantize(packed, state)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert torch.equal(ours.view(_BITS[ours.dtype]), reference.view(_BITS[ours.dtype]))
    assert torch.equal(ours, bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_is_bit_exact_for_each_format_and_dtype(quant_type, double_quant, dtype):
    _assert_exact(*_quantized(dtype, double_quant=double_quant, quant_type=quant_type))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
def test_kernel_is_bit_exact_for_every_blocksize_with_double_quant(blocksize):
    # 4323 elements: with blocksize 4096 a full block and a partial one; nested absmax blocks of 256 cross too.
    _assert_exact(*_quantized(torch.bfloat16, blocksize=blocksize))


def test_kernel_decodes_many_nested_absmax_blocks():
    # 300 · 70 / 32 = 657 absmax entries: three nested blocks of 256, the last partial.
    _assert_exact(*_quantized(torch.float16, blocksize=32, shape=(300, 70)))


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_reads_other_storage_dtypes_as_bytes(quant_storage):
    # bnb packs into fp32 storage only whole 4-byte words: 4160 elements.
    _assert_exact(*_quantized(torch.float32, quant_storage=quant_storage, shape=(32, 130)))


def test_kernel_decodes_a_real_linear4bit_layer():
    layer = bnb.nn.Linear4bit(
        45, 29, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(
        {"weight": torch.randn(29, 45, generator=torch.Generator().manual_seed(3)), "bias": torch.zeros(29)}
    )
    layer.weight = layer.weight.to("cpu")  # not yet quantized: moving quantizes it
    weight = layer.weight
    _assert_exact(weight.data, weight.quant_state)


def test_kernel_writes_into_the_given_buffer_and_returns_it():
    packed, state = _quantized(torch.bfloat16)
    buffer = torch.full(SHAPE, float("nan"), dtype=torch.bfloat16)
    returned = dequantize_op.nf4_dequantize(packed, state, out=buffer)
    assert returned is buffer
    assert torch.equal(buffer, reference_dequantize(packed, state))


@pytest.mark.parametrize(
    ("buffer", "problem"),
    [
        (torch.empty(SHAPE, dtype=torch.float16), "torch.float16"),
        (torch.empty(SHAPE[::-1], dtype=torch.bfloat16).T, "not contiguous"),
        (torch.empty(33, 130, dtype=torch.bfloat16), r"\(33, 130\)"),
    ],
    ids=["dtype", "strides", "shape"],
)
def test_a_buffer_that_does_not_fit_is_refused_naming_it(buffer, problem):
    packed, state = _quantized(torch.bfloat16)
    with pytest.raises(ValueError, match=problem):
        dequantize_op.nf4_dequantize(packed, state, out=buffer)


def test_the_op_runs_the_kernel_under_the_triton_backend(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(dequantize_op.reference, "nf4_dequantize", fail)
    packed, state = _quantized(torch.float32)
    assert dequantize_op.nf4_dequantize(packed, state).shape == SHAPE
