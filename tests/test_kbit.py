"""``prepare_model_for_kbit_training`` against peft 0.21.2's, on tiny Llamas loaded in 4-bit, 8-bit and bf16.

Each case loads the same saved checkpoint twice, prepares one copy with ours and one with peft's, and compares
what the function changes: every parameter's class, dtype and ``requires_grad``, the checkpointing flags and
kwargs of every module, and whether the input embeddings' output requires grad in a forward.
"""

import warnings

import pytest
import torch
from peft import prepare_model_for_kbit_training as peft_prepare
from torch import nn
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lora_engine.kbit import prepare_model_for_kbit_training

# bitsandbytes' CPU 4-bit kernels need a hidden size of at least 64.
TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

QUANTIZATIONS = {
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "bf16": None,
}

PREPARE_KWARGS = {
    "gc": {},
    "no_gc": {"use_gradient_checkpointing": False},
    "gc_non_reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    return folder


def load(folder, quantization: str) -> LlamaForCausalLM:
    config = QUANTIZATIONS[quantization]
    if config is None:
        return LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16)


def embedding_output_requires_grad(model: nn.Module) -> bool:
    """Whether the input embeddings' output requires grad in a forward (hooks added by the preparation included)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append(output.requires_grad)
    )
    try:
        model(torch.tensor([[1, 2, 3, 4]]))
    finally:
        handle.remove()
    return seen[0]


def prepared_state(model: nn.Module) -> dict:
    """Everything prepare_model_for_kbit_training may change, in a form that compares with ==."""
    return {
        "params": {
            name: (type(param).__name__, param.dtype, param.requires_grad)
            for name, param in model.named_parameters()
        },
        "checkpointing": {
            name: (module.gradient_checkpointing, getattr(module, "_gradient_checkpointing_func", None))
            for name, module in model.named_modules()
            if hasattr(module, "gradient_checkpointing")
        },
        "is_activation_checkpointing": model.is_activation_checkpointing,
        "embedding_output_requires_grad": embedding_output_requires_grad(model),
    }


def checkpoint_func_keywords(state: dict) -> dict:
    # functools.partial objects compare by identity; compare the kwargs they bind.
    return {
        name: (enabled, getattr(func, "keywords", None))
        for name, (enabled, func) in state.pop("checkpointing").items()
    }


def prepare_both(folder, quantization: str, kwargs: dict) -> tuple[dict, dict, nn.Module]:
    ours, theirs = load(folder, quantization), load(folder, quantization)
    with warnings.catch_warnings():
        # transformers 5.24 deprecates gradient_checkpointing_enable, which both call.
        warnings.simplefilter("ignore", FutureWarning)
        assert prepare_model_for_kbit_training(ours, **kwargs) is ours
        peft_prepare(theirs, **kwargs)
    ours_state, theirs_state = prepared_state(ours), prepared_state(theirs)
    ours_state["checkpointing"] = checkpoint_func_keywords(ours_state)
    theirs_state["checkpointing"] = checkpoint_func_keywords(theirs_state)
    return ours_state, theirs_state, ours


@pytest.mark.parametrize("kwargs_name", PREPARE_KWARGS)
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_model_is_prepared_like_peft(llama_folder, quantization, kwargs_name):
    ours, theirs, model = prepare_both(llama_folder, quantization, PREPARE_KWARGS[kwargs_name])

    assert ours == theirs
    assert not any(requires_grad for _, _, requires_grad in ours["params"].values())
    assert ours["is_activation_checkpointing"] == (kwargs_name != "no_gc")
    assert model.model.norm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    quantized_weight = model.model.layers[0].self_attn.q_proj.weight
    assert quantized_weight.dtype == (torch.uint8 if quantization == "nf4" else torch.int8)


def test_bf16_model_is_frozen_and_upcast_without_checkpointing_like_peft(llama_folder):
    ours, theirs, _ = prepare_both(llama_folder, "bf16", {})

    assert ours == theirs
    assert {(dtype, requires_grad) for _, dtype, requires_grad in ours["params"].values()} == {
        (torch.float32, False)
    }
    assert not ours["is_activation_checkpointing"]
    assert not ours["embedding_output_requires_grad"]


def test_gptq_marked_model_keeps_its_dtypes_but_gets_checkpointing_like_peft(llama_folder, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "quantization_method", "gptq", raising=False)
    ours, theirs, _ = prepare_both(llama_folder, "bf16", {})

    assert ours == theirs
    assert {dtype for _, dtype, _ in ours["params"].values()} == {torch.bfloat16}
    assert ours["is_activation_checkpointing"]
    assert ours["embedding_output_requires_grad"]


class OldStyleQuantizedModel(nn.Module):
    """A 4-bit-flagged model without enable_input_require_grads and with a kwarg-less gradient_checkpointing_enable."""

    is_loaded_in_4bit = True

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4, dtype=torch.float16)
        self.head = nn.Linear(4, 2, dtype=torch.bfloat16)
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def gradient_checkpointing_enable(self):
        self.gradient_checkpointing = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_model_without_hf_helpers_gets_an_embedding_hook_and_a_warning_for_dropped_kwargs():
    ours, theirs = OldStyleQuantizedModel(), OldStyleQuantizedModel()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}

    with pytest.warns(FutureWarning, match="use_reentrant"):
        prepare_model_for_kbit_training(ours, **kwargs)
    with pytest.warns(FutureWarning):
        peft_prepare(theirs, **kwargs)

    for model in (ours, theirs):
        assert model.gradient_checkpointing
        assert model.embed.weight.dtype == model.head.weight.dtype == torch.float32
        assert not any(param.requires_grad for param in model.parameters())
        assert model.embed(torch.tensor([1, 2])).requires_grad


def test_auto_clear_cache_is_accepted(llama_folder):
    model = load(llama_folder, "bf16")
    assert prepare_model_for_kbit_training(model, auto_clear_cache=False) is model
    assert model.lm_head.weight.dtype == torch.float32


def test_params4bit_not_yet_quantized_keeps_its_half_precision_like_peft():
    bnb = pytest.importorskip("bitsandbytes")

    def make() -> nn.Module:
        model = OldStyleQuantizedModel()
        # Before it is moved to a device, a Params4bit still holds the float weight that will be quantized.
        model.head = bnb.nn.Linear4bit(4, 2, compute_dtype=torch.bfloat16)
        model.head.weight.data = model.head.weight.data.to(torch.bfloat16)
        return model

    ours, theirs = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prepare_model_for_kbit_training(ours)
        peft_prepare(theirs)

    for model in (ours, theirs):
        assert isinstance(model.head.weight, bnb.nn.Params4bit)
        assert model.head.weight.dtype == torch.bfloat16
        assert model.head.bias.dtype == model.embed.weight.dtype == torch.float32
