"""torch.compile of a LoRA layer on a real bitsandbytes 4-bit base (CPU, reference backend): the layer's base and
first adapter are one ``lora_engine::nf4_lora_linear_forward`` node (nothing of bitsandbytes' matmul traced), the
graph is whole (``fullgraph=True``), and forward and gradients are eager's. ``torch.library.opcheck`` checks the
custom ops' schema, fake implementations and autograd registration.

Compiled with ``backend="aot_eager"`` as in ``test_compile.py`` (AOTAutograd traces forward and backward through
the fake implementations and the registered autograd; inductor would add only code generation).
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_F
import pytest
import torch
from torch._dynamo.utils import counters

import lora_engine
from lora_engine.ops import nf4_lora_linear as op

IN_FEATURES, OUT_FEATURES, RANK = 45, 29, 4  # 1305 weights: blocks of 64 cross rows, the last one partial


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _lora_4bit_model(double_quant: bool, in_features=IN_FEATURES, out_features=OUT_FEATURES):
    """A real ``Linear4bit`` (NF4, fp32 compute, bias) quantized on the CPU, wrapped with a LoRA adapter whose B
    is not zero, in training mode (dropout 0.1)."""
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(
        in_features,
        out_features,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    base.weight.data = torch.randn(out_features, in_features) * in_features**-0.5
    config = lora_engine.LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.1, target_modules=["0"])
    model = lora_engine.get_peft_model(torch.nn.Sequential(base.to("cpu")), config)  # .to quantizes
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def _forward_and_gradients(model, forward, x):
    """Output and the gradients of x and every trainable parameter; the RNG reseeded so dropout draws alike."""
    torch.manual_seed(3)
    out = forward(x)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return out.detach(), torch.autograd.grad(out.square().sum(), [x, *trainable])


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_a_compiled_4bit_lora_layer_gives_eager_forward_and_gradients(monkeypatch, double_quant):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    model = _lora_4bit_model(double_quant)
    x = torch.randn(3, 5, IN_FEATURES, generator=torch.Generator().manual_seed(2), requires_grad=True)
    eager_out, eager_grads = _forward_and_gradients(model, model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _forward_and_gradients(model, compiled, x)

    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    assert len(grads) == 3  # x, lora_A, lora_B
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-6)


def test_the_compiled_layer_holds_the_op_as_one_node_and_traces_nothing_of_bitsandbytes(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    model = _lora_4bit_model(double_quant=True)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    compiled(torch.randn(2, IN_FEATURES))
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("lora_engine.nf4_lora_linear_forward.default") == 1, targets
    assert not any("bitsandbytes" in target or "matmul_4bit" in target for target in targets), targets


@pytest.mark.skipif(
    not bnb_F.has_avx512bf16(), reason="bnb repacks 4-bit weights for CPU inference only with AVX512-BF16"
)
def test_a_compiled_layer_on_a_weight_bnb_repacked_for_the_cpu_keeps_bnb_matmul_and_eager_output(monkeypatch):
    # bnb's first no-grad eval forward repacks the weight in place; its portable copy cannot be made inside a
    # graph, so the compiled layer reads it through bitsandbytes' matmul, as in eager.
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    # bnb's CPU layout needs whole blocks per row: 64 → 32.
    model = _lora_4bit_model(double_quant=True, in_features=64, out_features=32).eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        eager = model(x)
        assert model.base_model.model[0].base_layer.weight.quant_state.packing_format_for_cpu
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def _op_operands(double_quant, dropout_p, bias):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    packed, quant_state = bnb_F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant)
    x = torch.randn(2, 3, IN_FEATURES, generator=generator, requires_grad=True)
    bias_ = torch.randn(OUT_FEATURES, generator=generator, requires_grad=True) if bias else None
    lora_A = torch.randn(RANK, IN_FEATURES, generator=generator, requires_grad=True)
    lora_B = torch.randn(OUT_FEATURES, RANK, generator=generator, requires_grad=True)
    seed = op.draw_seed(x.device) if dropout_p > 0.0 else None
    scaling = torch.tensor(1.5, dtype=torch.float64)
    forward_args = (
        "reference", x, packed, *op._state_arguments(quant_state), bias_, lora_A, lora_B, scaling, dropout_p, seed
    )  # fmt: skip
    return forward_args


@pytest.mark.parametrize(
    ("double_quant", "dropout_p", "bias"),
    [(True, 0.1, True), (False, 0.0, False)],
    ids=["double-dropout-bias", "single"],
)
def test_the_4bit_custom_ops_pass_opcheck(double_quant, dropout_p, bias):
    forward_args = _op_operands(double_quant, dropout_p, bias)
    assert all(result == "SUCCESS" for result in torch.library.opcheck(op._forward_op, forward_args).values())

    _, xa, keep_bits = op._forward_op(*forward_args)
    backend_name, x, *weight = forward_args[:13]
    *_, lora_A, lora_B, scaling, _, _ = forward_args
    grad_out = torch.randn(*x.shape[:-1], OUT_FEATURES, generator=torch.Generator().manual_seed(5))
    backward_args = (
        backend_name, grad_out, x.detach(), *weight, lora_A.detach(), lora_B.detach(), xa.detach(),
        keep_bits if dropout_p > 0.0 else None, scaling, dropout_p, True, True, True,
    )  # fmt: skip
    assert all(
        result == "SUCCESS" for result in torch.library.opcheck(op._backward_op, backward_args).values()
    )
