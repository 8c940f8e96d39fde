"""The Triton ``nf4_merge`` (under the interpreter) packs exactly what bitsandbytes' recipe packs: dequantize, add the
fp32 delta, ``quantize_4bit``; NF4 and FP4, with and without double quant, partial last blocks, subtract; and it
refuses a non-finite merge before anything is written."""

import pytest
import torch
from bitsandbytes import functional as bnb_F
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops.nf4_merge import nf4_merge

pytestmark = pytest.mark.usefixtures("kernels")

SHAPE = (29, 45)  # 1305 elements: the last block is partial, the last byte half padding


def _quantized(quant_type, double_quant, dtype=torch.bfloat16, blocksize=64):
    weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    return bnb_F.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def _delta(scale=0.3):
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("subtract", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_packs_what_bnb_quantize_4bit_packs(quant_type, double_quant, subtract):
    packed, state = _quantized(quant_type, double_quant)
    delta = _delta()
    merged = bnb_F.dequantize_4bit(packed, state).float()
    merged = merged - delta if subtract else merged + delta
    want_packed, want_state = bnb_F.quantize_4bit(merged, blocksize=64, quant_type=quant_type)
    new_packed, new_absmax = nf4_merge(packed, state, delta, subtract=subtract)
    assert torch.equal(new_packed, want_packed.reshape(-1))
    assert torch.equal(new_absmax, want_state.absmax)


@pytest.mark.parametrize("blocksize", [32, 256, 2048])
def test_merge_is_exact_for_other_blocksizes_and_fp16_weights(blocksize):
    packed, state = _quantized("nf4", True, torch.float16, blocksize)
    delta = _delta(0.05)
    merged = bnb_F.dequantize_4bit(packed, state).float() + delta
    want_packed, want_state = bnb_F.quantize_4bit(merged, blocksize=blocksize, quant_type="nf4")
    new_packed, new_absmax = nf4_merge(packed, state, delta)
    assert torch.equal(new_packed, want_packed.reshape(-1)) and torch.equal(new_absmax, want_state.absmax)


# numpy warns inside the interpreter about the very NaN/Inf the kernel must catch
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_merge_is_refused_and_nothing_is_written(bad):
    packed, state = _quantized("nf4", True)
    original_packed, original_absmax = packed.clone(), state.absmax.clone()
    delta = _delta()
    delta[28, 44] = bad  # in the partial last block
    with pytest.raises(FloatingPointError, match="nf4_merge: the merged 4-bit weight would hold NaN or Inf"):
        nf4_merge(packed, state, delta, check_finite=True)
    assert torch.equal(packed, original_packed) and torch.equal(state.absmax, original_absmax)


def test_a_delta_of_the_wrong_shape_is_refused_naming_it():
    packed, state = _quantized("nf4", False)
    with pytest.raises(ValueError, match=r"nf4_merge: delta is \(45, 29\) torch.float32"):
        nf4_merge(packed, state, _delta().T)
