"""The 4-bit LoRA layer on the reference backend (the CPU): fp32 training through the fused ``nf4_lora_linear`` op,
inference adding the low-rank term in place. Against peft + bitsandbytes on real ``Linear4bit`` layers where bnb
decodes right (rows of whole blocks), against the dense math on our bit-exact decode where it does not (bnb 0.50's
AVX-512 decode misplaces blocks that cross rows), and against the dense reference op with the same dropout mask."""

import pytest
import torch
import torch.nn.functional as F

from lora_engine.bench.builders import SingleLayer, with_lora
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.ops.nf4_lora_linear import nf4_lora_linear
from lora_engine.reference.nf4_dequantize import nf4_dequantize_torch

# As in the kernel tests: sums in another order round differently; atol relative to the largest entry.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
FORMAT_IDS = ["nf4-double", "nf4-single", "fp4-double", "fp4-single"]


def _linear4bit(in_features, out_features, quant_type, double_quant, compute_dtype=torch.float32, seed=0):
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, compute_dtype=compute_dtype, compress_statistics=double_quant,
        quant_type=quant_type,
    )  # fmt: skip
    layer.weight.data = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    layer.bias.data = torch.randn(out_features, generator=generator)
    return layer.to("cpu")  # quantizes


def _wrapped(impl, in_features, out_features, quant_type="nf4", double_quant=True, dropout=0.0, **kwargs):
    """``impl``'s LoRA layer (r 4, alpha 8, B nonzero) around a fresh 4-bit layer; same weights for every impl."""
    base = _linear4bit(in_features, out_features, quant_type, double_quant, **kwargs)
    model = with_lora(
        impl, SingleLayer(base, loaded_in_4bit=True), target_modules=["proj"], r=4, lora_alpha=8,
        lora_dropout=dropout,
    )  # fmt: skip
    return model.base_model.model.proj


def _assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    tolerance = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * max(1.0, want.abs().max().item()))


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _train_run(layer, x):
    """Output and the gradients of x, lora_A and lora_B of one training call, with a fixed upstream gradient."""
    layer.train()
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(_x(out.shape, seed=2))
    lora_A, lora_B = layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
    return out.detach(), (x.grad, lora_A.grad, lora_B.grad), out.grad_fn


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_training_output_and_every_gradient_match_peft(quant_type, double_quant):
    ours = _wrapped("ours", 128, 64, quant_type, double_quant)
    theirs = _wrapped("peft", 128, 64, quant_type, double_quant)
    x = _x((2, 5, 128))
    out, grads, grad_fn = _train_run(ours, x)
    want_out, want_grads, _ = _train_run(theirs, x)
    assert type(grad_fn).__name__ == "Nf4LoraLinearFunctionBackward"  # the fused op ran, not bnb's matmul
    _assert_close(out, want_out)
    for grad, want in zip(grads, want_grads, strict=True):
        _assert_close(grad, want)


def test_training_takes_a_non_contiguous_input_like_peft():
    ours, theirs = _wrapped("ours", 128, 64), _wrapped("peft", 128, 64)
    x = _x((128, 6)).T  # [6, 128], strides (1, 6)
    assert not x.is_contiguous()
    out, grads, _ = _train_run(ours, x)
    want_out, want_grads, _ = _train_run(theirs, x)
    _assert_close(out, want_out)
    for grad, want in zip(grads, want_grads, strict=True):
        _assert_close(grad, want)


def _dense_oracle(layer, x):
    """The layer's math on our bit-exact PyTorch decode of its weight, differentiated by plain autograd."""
    base = layer.base_layer
    weight = nf4_dequantize_torch(base.weight.data, base.weight.quant_state).float()
    lora_A, lora_B = layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
    x = x.detach().clone().requires_grad_()
    out = F.linear(x, weight, base.bias) + F.linear(F.linear(x, lora_A), lora_B) * layer.scaling["a0"]
    out.backward(_x(out.shape, seed=2))
    grads = (x.grad, lora_A.grad, lora_B.grad)
    lora_A.grad = lora_B.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("in_features", [45, 96], ids=["odd-width", "blocks-across-rows"])
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_training_matches_the_dense_oracle_where_blocks_cross_rows(quant_type, double_quant, in_features):
    layer = _wrapped("ours", in_features, 29, quant_type, double_quant)
    x = _x((7, in_features))
    want_out, want_grads = _dense_oracle(layer, x)
    out, grads, _ = _train_run(layer, x)
    _assert_close(out, want_out)
    for grad, want in zip(grads, want_grads, strict=True):
        _assert_close(grad, want)


def test_training_saves_no_dense_weight():
    layer = _wrapped("ours", 128, 64)
    layer.train()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(_x((3, 128)).requires_grad_())
    out.sum().backward()
    assert saved and max(saved) < 64 * 128  # x [3, 128], the factors, xa: nothing weight-sized


def _op_operands(in_features, out_features, dtype, quant_type="nf4", double_quant=True):
    layer = _linear4bit(in_features, out_features, quant_type, double_quant, compute_dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, in_features, generator=generator).to(dtype).requires_grad_()
    bias = layer.bias.detach().to(dtype).requires_grad_()
    lora_A = (torch.randn(4, in_features, generator=generator) * 0.2).to(dtype).requires_grad_()
    lora_B = (torch.randn(out_features, 4, generator=generator) * 0.2).to(dtype).requires_grad_()
    return layer.weight.data, layer.weight.quant_state, x, bias, lora_A, lora_B


def _op_run(run, leaves, seed=7):
    torch.manual_seed(seed)  # the dropout seed: both ops draw it the same way
    out = run()
    grads = torch.autograd.grad(out, leaves, grad_outputs=_x(out.shape, seed=2).to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize(
    ("dtype", "dropout_p"),
    [(torch.float32, 0.1), (torch.float32, 0.0), (torch.bfloat16, 0.1)],
    ids=["fp32-dropout", "fp32", "bf16-dropout"],
)
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_op_equals_the_dense_reference_op_on_the_decoded_weight(quant_type, double_quant, dtype, dropout_p):
    packed, state, x, bias, lora_A, lora_B = _op_operands(96, 40, dtype, quant_type, double_quant)
    weight = nf4_dequantize_torch(packed, state).to(dtype)
    leaves = (x, bias, lora_A, lora_B)
    out, grads = _op_run(
        lambda: nf4_lora_linear(x, packed, state, bias, lora_A, lora_B, 1.5, dropout_p), leaves
    )
    want_out, want_grads = _op_run(
        lambda: lora_linear(x, weight, bias, lora_A, lora_B, 1.5, dropout_p), leaves
    )
    assert out.dtype == dtype
    _assert_close(out, want_out)
    for grad, want in zip(grads, want_grads, strict=True):
        assert grad.dtype == want.dtype
        _assert_close(grad, want)


def test_dropout_in_training_runs_the_fused_op_and_drops():
    layer = _wrapped("ours", 128, 64, dropout=0.5)
    x = _x((64, 128))
    out, _, grad_fn = _train_run(layer, x)
    assert type(grad_fn).__name__ == "Nf4LoraLinearFunctionBackward"
    layer.eval()
    with torch.no_grad():
        assert not torch.allclose(
            out, layer(x)
        )  # the train-mode output had half of x dropped in the LoRA term


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_inference_matches_peft(quant_type, double_quant):
    ours = _wrapped("ours", 128, 64, quant_type, double_quant).eval()
    theirs = _wrapped("peft", 128, 64, quant_type, double_quant).eval()
    x = _x((2, 5, 128))
    with torch.no_grad():
        out, want = ours(x), theirs(x)
        again = ours(x)  # bnb has repacked the weight on AVX512-BF16 CPUs at the first call: same result
    _assert_close(out, want)
    _assert_close(again, want)


def test_inference_with_two_active_adapters_matches_peft():
    outputs = []
    for impl in ("ours", "peft"):
        base = _linear4bit(128, 64, "nf4", True)
        model = with_lora(
            impl, SingleLayer(base, loaded_in_4bit=True), adapters=2, target_modules=["proj"], r=4
        )
        model.base_model.set_adapter(["a0", "a1"])  # the second adapter adds into the first one's result
        with torch.no_grad():
            outputs.append(model.eval()(_x((6, 128))))
    _assert_close(*outputs)


def test_bf16_training_keeps_peft_sums_bit_for_bit():
    ours = _wrapped("ours", 128, 64, compute_dtype=torch.bfloat16)
    theirs = _wrapped("peft", 128, 64, compute_dtype=torch.bfloat16)
    x = _x((5, 128)).bfloat16()
    out, grads, grad_fn = _train_run(ours, x)
    want_out, want_grads, _ = _train_run(theirs, x)
    assert (
        type(grad_fn).__name__ != "Nf4LoraLinearFunctionBackward"
    )  # half precision: bnb's matmul + the term
    assert torch.equal(out, want_out)
    for grad, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)
