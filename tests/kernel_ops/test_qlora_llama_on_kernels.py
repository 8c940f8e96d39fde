"""A whole tiny Llama with a real bitsandbytes 4-bit base (CPU backend), wrapped by ``get_peft_model``, gives the
same logits and LoRA gradients on the Triton backend (under the interpreter: every 4-bit layer runs
``nf4_lora_linear``'s kernels) as on the reference backend (bitsandbytes' matmul plus the rank-r op)."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine import LoraConfig, get_peft_model

pytestmark = pytest.mark.usefixtures("kernels")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
VOCAB_SIZE = 128


def _qlora_llama(tiny_llama_4bit_folder, compute_dtype, dropout):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = LlamaForCausalLM.from_pretrained(
        tiny_llama_4bit_folder, quantization_config=quantization, dtype=compute_dtype
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bnb's CPU-only repacking at a no-grad eval forward would change the reference side's layout.
            module.support_avx512bf16_for_cpu = False
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, config).train(dropout > 0)


def _logits_and_lora_grads(model, input_ids):
    torch.manual_seed(123)  # the same dropout seeds, call for call, on both backends
    logits = model(input_ids=input_ids).logits
    logits.float().square().mean().backward()
    grads = {name: param.grad for name, param in model.named_parameters() if "lora_" in name}
    assert grads and all(grad is not None for grad in grads.values())
    return logits.detach(), grads


@pytest.mark.parametrize(
    ("compute_dtype", "dropout"),
    [(torch.float32, 0.0), (torch.bfloat16, 0.1)],
    ids=["fp32", "bf16-dropout"],
)
def test_4bit_llama_logits_and_lora_gradients_match_the_reference_backend(
    kernels, tiny_llama_4bit_folder, monkeypatch, compute_dtype, dropout
):
    model = _qlora_llama(tiny_llama_4bit_folder, compute_dtype, dropout)
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(0))
    calls = []
    original = kernels.nf4_lora_linear.forward
    monkeypatch.setattr(kernels.nf4_lora_linear, "forward", lambda *args: calls.append(1) or original(*args))
    logits, grads = _logits_and_lora_grads(model, input_ids)
    assert len(calls) == 7 * 2  # every linear layer of both decoder layers ran the 4-bit kernels

    model.zero_grad()
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    want_logits, want_grads = _logits_and_lora_grads(model, input_ids)
    assert len(calls) == 7 * 2

    tolerance = TOLERANCE[compute_dtype]
    torch.testing.assert_close(logits, want_logits, atol=tolerance, rtol=tolerance)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        scale = max(1.0, want_grads[name].abs().max().item())
        torch.testing.assert_close(grad, want_grads[name], atol=tolerance * scale, rtol=tolerance, msg=name)
