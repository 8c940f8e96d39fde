"""Shared fixtures: tiny transformers models built from configs (never downloaded), with fixed weights per seed.

The same seed gives the same weights, so that a peft model and a lora_engine model can be built from identical
bases and compared tensor for tensor.
"""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB_SIZE = 128


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_llama_4bit_folder(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64, intermediate 128, seed 0) saved in full precision as one
    ``model.safetensors``, for loading with a 4-bit ``BitsAndBytesConfig``. Every weight row holds whole blocks
    of 64: bnb 0.50's CPU 4-bit path needs rows of at least a blocksize, and its AVX-512 decode is wrong on rows
    that split a block (see ``ops.nf4_dequantize``). Read-only: tests must not write into it."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama_4bit")
    model.save_pretrained(folder)
    return folder


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=64)


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )


def _factory(model_class, make_config):
    """A function `make(seed=0, dtype=torch.float32)` building a fresh model in eval mode, weights fixed by seed."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float32):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(make_config())
        return model.to(dtype).eval()

    return make


@pytest.fixture
def llama_factory():
    return _factory(LlamaForCausalLM, tiny_llama_config)


@pytest.fixture
def gpt2_factory():
    return _factory(GPT2LMHeadModel, tiny_gpt2_config)


@pytest.fixture
def bert_cls_factory():
    return _factory(BertForSequenceClassification, tiny_bert_config)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(0))


def copy_lora_weights(src_peft_model, dst_model) -> None:
    """Copy every tensor of a peft model (adapters included) into ours; the in-memory keys are identical."""
    dst_model.load_state_dict(src_peft_model.state_dict(), strict=True)


def move_dora_magnitudes_off_their_norms(model) -> None:
    """Scale every DoRA magnitude by ``linspace(0.5, 1.5)``, in place: at init ``m = ‖W + s·B A‖`` and DoRA's
    rescaling is the identity, which would hide a wrong rescaling."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.linspace(0.5, 1.5, parameter.numel()).view(parameter.shape))


def mixed_batch_and_single_runs(model, run, inputs, routes):
    """``(mixed, alone)``: ``run(model, inputs, adapter_names=routes)`` and, per row ``b``, ``run`` on that row
    alone with ``routes[b]`` active (``"__base__"``: adapters disabled). Eval, no grad; leaves ``model`` with the
    last routed adapter active."""
    with torch.no_grad():
        mixed = run(model, inputs, adapter_names=routes)
        alone = []
        for row, name in enumerate(routes):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(run(model, inputs[row : row + 1]))
            else:
                model.set_adapter(name)
                alone.append(run(model, inputs[row : row + 1]))
    return mixed, torch.cat(alone)
