"""The Triton ``nf4_merge`` (under the interpreter) packs exactly what bitsandbytes' recipe packs: dequantize, add the
fp32 delta, ``quantize_4bit``; NF4 and FP4, with and without double quant, partial last blocks, subtract; and it
refuses a non-finite merge before anything is written."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine import LoraConfig, backend, get_peft_model
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


class _Tiny4bit(torch.nn.Module):
    def __init__(self, quant_type, double_quant):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(
            64, 40, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=double_quant
        )

    def forward(self, x):
        return self.proj(x)


def _lora_4bit(quant_type, double_quant):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _Tiny4bit(quant_type, double_quant)
        module.proj.weight = module.proj.weight.to("cpu")  # moving an unquantized Params4bit quantizes it
        module.proj.support_avx512bf16_for_cpu = False  # keep bnb's portable layout (see tests/test_qlora.py)
        config = LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False)
        return get_peft_model(module, config)


@pytest.mark.filterwarnings("ignore:Merge lora module", "ignore:Unmerge lora module")
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_lora_linear_4bit_merges_through_the_kernel_byte_for_byte_as_the_recipe(
    kernels, monkeypatch, quant_type, double_quant
):
    calls = []
    merge_kernel = kernels.nf4_merge.nf4_merge
    monkeypatch.setattr(
        kernels.nf4_merge, "nf4_merge", lambda *a, **k: calls.append(1) or merge_kernel(*a, **k)
    )
    ours, theirs = _lora_4bit(quant_type, double_quant), _lora_4bit(quant_type, double_quant)
    ours.merge_adapter()
    with monkeypatch.context() as reference:
        reference.setenv(backend.ENV_VAR, "reference")
        theirs.merge_adapter()
    assert calls == [1]
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
