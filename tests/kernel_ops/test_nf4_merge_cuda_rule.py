"""The Triton ``nf4_merge`` with bitsandbytes' CUDA rounding rule (``rule="cuda"``, the default on CUDA) packs what
bnb's CUDA recipe packs: dequantize, add the fp32 delta, ``quantize_4bit`` on the GPU.

Under the interpreter (CPU tensors) the oracle is the rule's emulation, ``reference.nf4_quantize``: odd shapes,
partial last blocks, NF4 and FP4, blocksizes 64 and 4096, double quant on and off, subtract, and sums that sit on
and next to the thresholds, on zero blocks and on subnormals. On a GPU (``benchmarks/kernel_tests_on_cuda.py``)
these same tests get CUDA tensors and compiled kernels, and the oracle is bnb's own CUDA ``quantize_4bit``; the
CUDA-only tests at the end check the whole merge and the 4-bit layer against bnb there, and the emulation where
its reciprocal is exact (the interpreter's reciprocal is correctly rounded, the GPU's is MUFU.RCP)."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine import LoraConfig, backend, get_peft_model
from lora_engine.ops.nf4_merge import nf4_merge
from lora_engine.reference.nf4_quantize import FP4_THRESHOLDS, NF4_THRESHOLDS, quantize_4bit_cuda

pytestmark = pytest.mark.usefixtures("kernels")

SHAPES = {64: (29, 45), 4096: (67, 131)}  # 1305 and 8777 elements: partial last blocks, odd counts
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bnb's CUDA kernel)")


def _cuda_quantized(
    values: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed bytes, absmax)`` of bnb's CUDA quantizer: bnb itself on a CUDA tensor, its emulation elsewhere."""
    if values.is_cuda:
        packed, state = bnb_F.quantize_4bit(values, blocksize=blocksize, quant_type=quant_type)
        return packed.reshape(-1), state.absmax
    return quantize_4bit_cuda(values, blocksize, quant_type)


def _quantized(shape, quant_type, double_quant, blocksize, dtype=torch.bfloat16):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return bnb_F.quantize_4bit(
        weight.to(dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def _recipe(packed, state, delta, subtract):
    """The reference merge's fp32 sum: ``dequantize_4bit(...).float() ± delta``."""
    merged = bnb_F.dequantize_4bit(packed, state).float()
    return merged - delta if subtract else merged + delta


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_packs_what_bnb_cuda_quantize_4bit_packs(quant_type, blocksize, double_quant):
    packed, state = _quantized(SHAPES[blocksize], quant_type, double_quant, blocksize)
    delta = 0.3 * torch.randn(SHAPES[blocksize], generator=torch.Generator().manual_seed(1))
    new_packed, new_absmax = nf4_merge(packed, state, delta, rule="cuda")
    want_packed, want_absmax = _cuda_quantized(_recipe(packed, state, delta, False), blocksize, quant_type)
    assert torch.equal(new_packed, want_packed) and torch.equal(new_absmax, want_absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_unmerge_packs_what_bnb_cuda_quantize_4bit_packs(quant_type):
    packed, state = _quantized(SHAPES[64], quant_type, True, 64, torch.float16)
    delta = 0.3 * torch.randn(SHAPES[64], generator=torch.Generator().manual_seed(1))
    new_packed, new_absmax = nf4_merge(packed, state, delta, subtract=True, rule="cuda")
    want_packed, want_absmax = _cuda_quantized(_recipe(packed, state, delta, True), 64, quant_type)
    assert torch.equal(new_packed, want_packed) and torch.equal(new_absmax, want_absmax)


def _adversarial_sums(quant_type: str) -> torch.Tensor:
    """917 fp32 values (on the CPU) in blocks of 64: thresholds and their fp32 neighbours in a block of absmax 1
    (exact reciprocal), the same times 3 in a block of absmax 3 (rounded reciprocal), an all-zero block, a block of
    subnormals, ten random blocks (the first led by ±the smallest normal, which scale to subnormals), and a partial
    last block of thresholds."""
    cpu = {"device": "cpu"}
    thresholds = NF4_THRESHOLDS if quant_type == "nf4" else torch.cat([FP4_THRESHOLDS, -FP4_THRESHOLDS])
    near = torch.cat(
        [thresholds, *(torch.nextafter(thresholds, torch.tensor(to, **cpu)) for to in (1.0, -1.0))]
    )
    unit = torch.cat([torch.ones(1, **cpu), near, torch.zeros(63 - near.numel(), **cpu)])
    subnormals = torch.tensor([1e-40, -1e-40], **cpu).repeat(32)
    random = torch.randn(640, generator=torch.Generator().manual_seed(2), **cpu)
    random[:2] = torch.tensor([-1.0, 1.0], **cpu) * torch.finfo(torch.float32).tiny
    return torch.cat([unit, 3 * unit, torch.zeros(64, **cpu), subnormals, random, unit[:21]])


# numpy warns inside the interpreter about the all-zero block's 1 / 0 and 0 * inf, which bnb's kernel computes too
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_sums_on_and_next_to_thresholds_zero_blocks_and_subnormals_pack_as_bnb_cuda(quant_type):
    # The weight is all zeros, so the merged sums are the delta itself, bit for bit.
    packed, state = bnb_F.quantize_4bit(torch.zeros(917), blocksize=64, quant_type=quant_type)
    delta = _adversarial_sums(quant_type).to(packed.device)
    new_packed, new_absmax = nf4_merge(packed, state, delta, rule="cuda")
    want_packed, want_absmax = _cuda_quantized(delta, 64, quant_type)
    assert torch.equal(new_packed, want_packed) and torch.equal(new_absmax, want_absmax)


def test_an_unknown_rule_is_refused_naming_it():
    packed, state = _quantized((4, 16), "nf4", False, 64)
    with pytest.raises(ValueError, match="nf4_merge: rule is 'gpu'; expected one of"):
        nf4_merge(packed, state, torch.zeros(4, 16), rule="gpu")


# numpy warns inside the interpreter about the very NaN/Inf the kernel must catch
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_non_finite_merge_is_refused_under_the_cuda_rule_too():
    packed, state = _quantized(SHAPES[64], "nf4", True, 64)
    delta = torch.zeros(SHAPES[64])
    delta[28, 44] = float("nan")
    with pytest.raises(FloatingPointError, match="nf4_merge: the merged 4-bit weight would hold NaN or Inf"):
        nf4_merge(packed, state, delta, check_finite=True, rule="cuda")


# --- CUDA only: the compiled kernel against bnb's CUDA kernel (skipped here; run by benchmarks/gpu_session.sh) ---


def _compiled(kernels) -> None:
    if kernels.nf4_merge.INTERPRETED:
        pytest.skip("compiled kernels only: the interpreter's reciprocal is not the GPU's MUFU.RCP")


@needs_cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_on_cuda_equals_bnb_cuda_recipe_for_other_blocksizes(kernels, quant_type):
    _compiled(kernels)
    # 64 and 4096, single and double quant, run above (on a GPU those tests get CUDA tensors too); bnb quantizes
    # blocks of 32 and 64 with its small-block kernel, larger ones with kQuantizeBlockwise.
    for blocksize in (32, 128, 1024):
        packed, state = _quantized((301, 517), quant_type, True, blocksize)  # odd count, partial last block
        packed = packed.cuda()
        state.to("cuda")  # in place (QuantState.to returns None)
        delta = 0.3 * torch.randn(301, 517, generator=torch.Generator().manual_seed(1)).cuda()
        new_packed, new_absmax = nf4_merge(packed, state, delta)
        merged = _recipe(packed, state, delta, False)
        want_packed, want_state = bnb_F.quantize_4bit(merged, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(new_packed, want_packed.reshape(-1)), blocksize
        assert torch.equal(new_absmax, want_state.absmax), blocksize


@needs_cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_emulation_equals_bnb_cuda_where_the_reciprocal_is_exact(quant_type):
    # Every block's absmax a power of two: 1.0f / absmax is exact whatever MUFU.RCP rounds, so the emulation's
    # correctly rounded reciprocal is the GPU's and every index must be the tree's.
    values = _adversarial_sums(quant_type)
    values[64:128] /= 3 * 8  # the absmax-3 block: absmax 1/8
    random_blocks = values[256:896].view(10, 64)
    random_blocks.clamp_(-1.99, 1.99)[:, 2] = 2.0  # absmax 2 (after the first block's ±smallest normal)
    want_packed, want_absmax = quantize_4bit_cuda(values, 64, quant_type)
    packed, state = bnb_F.quantize_4bit(values.cuda(), blocksize=64, quant_type=quant_type)
    assert torch.equal(packed.reshape(-1).cpu(), want_packed) and torch.equal(state.absmax.cpu(), want_absmax)


class _Tiny4bit(torch.nn.Module):
    def __init__(self, quant_type, double_quant):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(
            64, 40, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=double_quant
        )

    def forward(self, x):
        return self.proj(x)


def _lora_4bit_on_cuda(quant_type, double_quant):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Moving an unquantized Params4bit quantizes it, here with bnb's CUDA kernel.
        module = _Tiny4bit(quant_type, double_quant).to("cuda")
        config = LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False)
        return get_peft_model(module, config)


@needs_cuda
@pytest.mark.filterwarnings("ignore:Merge lora module", "ignore:Unmerge lora module")
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_lora_linear_4bit_on_cuda_merges_through_the_kernel_byte_for_byte_as_the_recipe(
    kernels, monkeypatch, quant_type, double_quant
):
    _compiled(kernels)
    calls = []
    merge_kernel = kernels.nf4_merge.nf4_merge
    monkeypatch.setattr(
        kernels.nf4_merge, "nf4_merge", lambda *a, **k: calls.append(1) or merge_kernel(*a, **k)
    )
    ours, theirs = _lora_4bit_on_cuda(quant_type, double_quant), _lora_4bit_on_cuda(quant_type, double_quant)
    ours.merge_adapter()
    with monkeypatch.context() as reference:
        reference.setenv(backend.ENV_VAR, "reference")
        theirs.merge_adapter()
    assert calls == [1]
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
