"""nf4_dequantize against bitsandbytes' own decode, bit for bit (up to the sign of FP4's zero, on which bnb's decodes
disagree among themselves): NF4 and FP4, with and without double quant, every blocksize bnb accepts, odd shapes,
fp32/fp16/bf16, packed by ``quantize_4bit`` and by real ``Linear4bit`` layers."""

import copy
from math import prod

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F

from lora_engine.ops.nf4_dequantize import nf4_dequantize
from lora_engine.reference import nf4_dequantize as reference

QUANT_TYPES = ["nf4", "fp4"]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Each takes a different path through bnb's CPU decode: (67, 130) its scalar C++ loop (width not a multiple of
# 16), (33, 131) its pure-PyTorch fallback (odd width), (4, 4096) its AVX-512 kernel where the CPU has one
# (blocksize < 2048; the width is a multiple of every blocksize, the only case that kernel indexes right).
SHAPES = [(67, 130), (33, 131), (4, 4096)]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_equal_up_to_zero_sign(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same shape, dtype and values (``torch.equal``): bit for bit, except that -0.0 equals 0.0, because bnb's
    own decodes disagree on the sign of FP4's zero (index 8): +0.0 on CPU's AVX-512 and pure-PyTorch paths, -0.0
    in its scalar C++ loop and on CUDA."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    mismatched = (ours != theirs).sum().item()
    assert torch.equal(ours, theirs), f"{mismatched} of {ours.numel()} elements differ"


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same shape, dtype and bits, the sign of zero included."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours.view(_BITS[ours.dtype]), theirs.view(_BITS[theirs.dtype]))


def _weight(shape, dtype, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bnb_flat_decode(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bnb's decode of the same bytes through its pure-PyTorch path, which indexes blocks over the flattened
    weight: asking for a ``[numel, 1]`` weight (odd width) routes ``dequantize_4bit`` there on CPU."""
    column_state = copy.copy(quant_state)
    column_state.shape = torch.Size((prod(quant_state.shape), 1))
    return bnb_F.dequantize_4bit(packed, column_state).reshape(quant_state.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matches_bnb_dequantize_4bit(quant_type, double_quant, blocksize, shape, dtype):
    packed, state = bnb_F.quantize_4bit(
        _weight(shape, dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert_equal_up_to_zero_sign(nf4_dequantize(packed, state), bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_same_bits_as_bnb_pure_pytorch_decode_sign_of_zero_included(
    quant_type, double_quant, blocksize, dtype
):
    weight = _weight((67, 130), dtype)
    weight[::4] = 0.0
    packed, state = bnb_F.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert_same_bits(nf4_dequantize(packed, state), _bnb_flat_decode(packed, state))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matches_bnb_for_a_linear4bit_layer_quantized_on_cpu(quant_type, double_quant, dtype, quant_storage):
    layer = bnb.nn.Linear4bit(
        130,
        48,
        compute_dtype=dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    layer.weight.data = _weight((48, 130), dtype)
    layer = layer.to("cpu")  # quantizes
    packed, state = layer.weight.data, layer.weight.quant_state
    assert packed.dtype == quant_storage and state.quant_type == quant_type and state.nested == double_quant
    assert_equal_up_to_zero_sign(nf4_dequantize(packed, state), bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_decodes_a_quant_state_rebuilt_from_its_serialized_form(double_quant):
    # As when a pre-quantized checkpoint is loaded: QuantState.from_dict over the packed state_dict entries.
    packed, state = bnb_F.quantize_4bit(
        _weight((67, 130), torch.bfloat16), blocksize=128, compress_statistics=double_quant, quant_type="nf4"
    )
    loaded = bnb_F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert_equal_up_to_zero_sign(nf4_dequantize(packed, loaded), bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_returns_a_new_tensor_of_quant_state_shape_and_dtype_leaving_inputs_untouched(dtype):
    packed, state = bnb_F.quantize_4bit(_weight((3, 7, 10), dtype), blocksize=64, compress_statistics=True)
    before = [t.clone() for t in (packed, state.absmax, state.state2.absmax, state.state2.code, state.offset)]
    out = nf4_dequantize(packed, state)
    assert out.shape == (3, 7, 10) and out.dtype == dtype and out.device == packed.device
    assert out.data_ptr() not in {packed.data_ptr(), state.absmax.data_ptr()}
    after = (packed, state.absmax, state.state2.absmax, state.state2.code, state.offset)
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert_equal_up_to_zero_sign(out, bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_rows_and_largest_magnitudes_still_match_bnb(quant_type, double_quant, dtype):
    # fp32/bf16 stop at 1e30 so that bnb's double-quant mean of absmax cannot overflow to inf.
    largest = torch.finfo(torch.float16).max if dtype == torch.float16 else 1e30
    for shape in [(16, 4096), (67, 130)]:
        weight = (_weight(shape, torch.float32) * largest / 8).clamp(-largest, largest)
        weight[::3] = 0.0
        weight[1, :5] = largest
        weight[2, -3:] = -largest
        packed, state = bnb_F.quantize_4bit(
            weight.to(dtype), blocksize=64, compress_statistics=double_quant, quant_type=quant_type
        )
        ours = nf4_dequantize(packed, state)
        assert_equal_up_to_zero_sign(ours, bnb_F.dequantize_4bit(packed, state))
        assert (ours[::3] == 0).all()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_subnormal_bf16_results_are_kept_like_bnb_reference_decode(quant_type):
    # bnb's AVX512-BF16 CPU kernel converts with VCVTNEPS2BF16, which flushes subnormal fp32 to zero; its
    # scalar, pure-PyTorch and CUDA decodes keep them, and so does this op.
    weight = (_weight((16, 4096), torch.float32) * 1e-38).to(torch.bfloat16)
    packed, state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    ours = nf4_dequantize(packed, state)
    assert_same_bits(ours, _bnb_flat_decode(packed, state))
    magnitudes = ours.float().abs()
    assert ((magnitudes > 0) & (magnitudes < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.parametrize(
    ("shape", "blocksize"), [((10, 64), 128), ((6, 144), 64), ((4, 32), 64), ((8, 256), 512)]
)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_blocks_run_across_rows_where_bnb_avx512_kernel_indexes_per_row(quant_type, shape, blocksize):
    # For widths that are a multiple of 16 but not of blocksize, bnb 0.50's AVX-512 CPU kernel reads
    # absmax[row * (width // blocksize) + col // blocksize], not the element's flat block.
    packed, state = bnb_F.quantize_4bit(
        _weight(shape, torch.float32), blocksize=blocksize, compress_statistics=True, quant_type=quant_type
    )
    assert_same_bits(nf4_dequantize(packed, state), _bnb_flat_decode(packed, state))


@pytest.mark.parametrize(
    ("shape", "quant_storage"), [((1, 2), torch.uint8), ((2, 4), torch.float32)], ids=["2-uint8", "8-fp32"]
)
def test_returns_quant_state_shape_where_bnb_transposes_single_row_packing(shape, quant_storage):
    # bnb's dequantize_4bit transposes its result when packed.shape[0] == 1 (a shim for an old layout).
    packed, state = bnb_F.quantize_4bit(_weight(shape, torch.float32), quant_storage=quant_storage)
    assert packed.shape[0] == 1
    ours = nf4_dequantize(packed, state)
    assert ours.shape == shape
    assert_equal_up_to_zero_sign(ours, bnb_F.dequantize_4bit(packed, state).t())


def test_rejects_an_unknown_quant_type_naming_it():
    packed, state = bnb_F.quantize_4bit(_weight((4, 8), torch.float32))
    state.quant_type = "int4"
    with pytest.raises(ValueError, match="'int4'.*'nf4' or 'fp4'"):
        nf4_dequantize(packed, state)


def test_rejects_packed_bytes_too_few_for_the_shape():
    packed, state = bnb_F.quantize_4bit(_weight((4, 8), torch.float32))
    with pytest.raises(ValueError, match=r"8 bytes.*needs 16"):
        nf4_dequantize(packed[:8], state)


def test_triton_backend_raises_naming_the_op(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    packed, state = bnb_F.quantize_4bit(_weight((4, 8), torch.float32))
    with pytest.raises(RuntimeError, match="nf4_dequantize"):
        nf4_dequantize(packed, state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matches_bnb_on_cuda_tensors(quant_type, double_quant, dtype):
    for shape, blocksize in [((67, 130), 64), ((10, 64), 128), ((33, 131), 256)]:
        packed, state = bnb_F.quantize_4bit(
            _weight(shape, dtype).cuda(),
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        ours = nf4_dequantize(packed, state)
        assert ours.device == packed.device
        assert_equal_up_to_zero_sign(ours, bnb_F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cpu_fast_path_has_the_same_bits_as_the_pytorch_oracle(quant_type, double_quant, blocksize, dtype):
    # NF4 rows of whole blocks take bnb's compiled CPU decode, asked for fp32 and cast by torch, so bf16
    # subnormals (the tiny row) are kept; all-zero rows check the sign of zero. FP4 runs the oracle itself.
    weight = _weight((8, 4096), torch.float32)
    weight[::3] = 0.0
    weight[1] *= 1e-38
    packed, state = bnb_F.quantize_4bit(
        weight.to(dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert_same_bits(nf4_dequantize(packed, state), reference.nf4_dequantize_torch(packed, state))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cpu_fast_path_decodes_three_dimensional_shapes_like_the_oracle(quant_type):
    packed, state = bnb_F.quantize_4bit(
        _weight((3, 5, 128), torch.bfloat16), blocksize=64, quant_type=quant_type
    )
    ours = nf4_dequantize(packed, state)
    assert ours.shape == (3, 5, 128)
    assert_same_bits(ours, reference.nf4_dequantize_torch(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128, 2048])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("shape", [(40, 688), (7, 96), (45, 29), (3, 5, 7)], ids=str)
def test_cpu_fast_path_decodes_blocks_across_rows_and_a_partial_last_block_like_the_oracle(
    shape, double_quant, blocksize, dtype
):
    # Widths that are not a multiple of the blocksize: bnb's kernel is asked for rows of whole blocks, and a partial
    # last block (45 x 29, 3 x 5 x 7: an odd count too) is decoded apart.
    weight = _weight(shape, torch.float32)
    weight.view(-1)[::5] *= 1e-38
    packed, state = bnb_F.quantize_4bit(
        weight.to(dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    assert_same_bits(nf4_dequantize(packed, state), reference.nf4_dequantize_torch(packed, state))
