"""A whole tiny Llama wrapped by ``get_peft_model`` gives the same logits and LoRA gradients on the Triton
backend (under the interpreter) as on the reference backend, and merges to the same weights."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine import LoraConfig, get_peft_model

pytestmark = pytest.mark.usefixtures("kernels")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _peft_llama(llama_factory, dtype, dropout, **options):
    # init_lora_weights=False keeps nn.Linear's init for lora_B, so the adapters are not a no-op; the seed fixes
    # them, so two calls build identical models.
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        lora_dropout=dropout,
        init_lora_weights=False,
        **options,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(llama_factory(0, dtype=dtype), config)


def _logits_and_lora_grads(model, input_ids):
    torch.manual_seed(123)  # the same dropout seeds, call for call, on both backends
    logits = model(input_ids=input_ids).logits
    logits.float().square().mean().backward()
    grads = {name: param.grad for name, param in model.named_parameters() if "lora_" in name}
    assert grads and all(grad is not None for grad in grads.values())
    return logits.detach(), grads


def _assert_close(got, want, dtype):
    torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("dtype", "dropout"),
    [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 0.1)],
    ids=["fp32", "bf16-base-fp32-adapters", "fp32-dropout"],
)
def test_logits_and_lora_gradients_match_the_reference_backend(
    kernels, llama_factory, input_ids, monkeypatch, dtype, dropout
):
    # With dropout, both backends hash the same seeds (drawn call for call) into the same masks.
    model = _peft_llama(llama_factory, dtype, dropout).train(dropout > 0)
    logits, grads = _logits_and_lora_grads(model, input_ids)

    model.zero_grad()
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    want_logits, want_grads = _logits_and_lora_grads(model, input_ids)

    _assert_close(logits, want_logits, dtype)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # adapters upcast to fp32
        _assert_close(grad, want_grads[name], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base-fp32-adapters"])
def test_dora_logits_and_gradients_match_the_reference_backend_with_the_dora_norm_kernel(
    kernels, llama_factory, input_ids, monkeypatch, dtype
):
    model = _peft_llama(llama_factory, dtype, 0.0, use_dora=True).train()
    calls = []
    monkeypatch.setattr(kernels.dora_norm, "dora_norm", _counting(kernels.dora_norm.dora_norm, calls))
    logits, grads = _logits_and_lora_grads(model, input_ids)
    assert len(calls) == 7 * 2  # every linear layer of both decoder layers took its norm from the kernel

    model.zero_grad()
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    want_logits, want_grads = _logits_and_lora_grads(model, input_ids)
    _assert_close(logits, want_logits, dtype)
    assert grads.keys() == want_grads.keys() and any("lora_magnitude_vector" in name for name in grads)
    for name, grad in grads.items():
        _assert_close(grad, want_grads[name], dtype)


def test_merge_and_unmerge_match_the_reference_backend(kernels, llama_factory, input_ids, monkeypatch):
    ours = _peft_llama(llama_factory, torch.float32, 0.0)
    unmerged_logits = ours(input_ids=input_ids).logits.detach()
    ours.merge_adapter()
    merged_logits = ours(input_ids=input_ids).logits.detach()
    merged = {name: tensor.clone() for name, tensor in ours.state_dict().items() if "base_layer" in name}
    ours.unmerge_adapter()

    monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
    theirs = _peft_llama(llama_factory, torch.float32, 0.0)
    theirs.merge_adapter()
    for name, tensor in theirs.state_dict().items():
        if "base_layer" in name:
            torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(input_ids=input_ids).logits.detach(), unmerged_logits)


def test_mixed_adapter_batch_runs_the_grouped_kernels_and_matches_the_reference_backend(
    kernels, llama_factory, monkeypatch
):
    model = _peft_llama(
        llama_factory, torch.float32, 0.0
    ).eval()  # mixed batches are for inference (peft's rule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model.add_adapter(
            "other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    input_ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(0))
    routes = ["other", "__base__", "default", "other"]  # ranks 2 and 4 in one batch, and a base-only row
    calls = []
    monkeypatch.setattr(
        kernels.grouped_lora, "grouped_lora_", _counting(kernels.grouped_lora.grouped_lora_, calls)
    )
    with torch.no_grad():
        ours = model(input_ids=input_ids, adapter_names=routes).logits
        monkeypatch.setenv("LORA_ENGINE_BACKEND", "reference")
        theirs = model(input_ids=input_ids, adapter_names=routes).logits
    assert len(calls) == 7 * 2  # every linear layer of both decoder layers ran the kernels
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted
