"""A LoRA model under accelerate's offloading (``cpu_offload``, or ``dispatch_model`` with a layer on disk: weights
kept on the ``meta`` device and loaded only around their module's forward) computes what it computes without
offloading, as peft's does, and leaves no weight loaded after the call."""

import peft
import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_engine

CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128,
)  # fmt: skip
TOKENS = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))


def _two_adapter_model(library):
    torch.manual_seed(0)
    model = library.get_peft_model(
        LlamaForCausalLM(CONFIG),
        library.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.add_adapter(
        "other", library.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    return model.eval()


def _offloaded(model):
    cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
    return model


def _weights_on_meta(model):
    return {
        name: param.device.type for name, param in model.named_parameters() if param.device.type != "meta"
    }


@pytest.mark.parametrize("library", [lora_engine, peft], ids=["lora_engine", "peft"])
def test_an_offloaded_lora_model_computes_what_it_computes_in_memory(library):
    model = _two_adapter_model(library)
    with torch.no_grad():
        want = model(input_ids=TOKENS).logits
        got = _offloaded(model)(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _weights_on_meta(model) == {}  # nothing stays loaded after the call


def test_an_offloaded_mixed_batch_equals_the_in_memory_one():
    model = _two_adapter_model(lora_engine)
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        want = model(input_ids=TOKENS, adapter_names=names).logits
        got = _offloaded(model)(input_ids=TOKENS, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _weights_on_meta(model) == {}


def test_an_offloaded_lora_model_generates_as_peft_does():
    ours, theirs = _offloaded(_two_adapter_model(lora_engine)), _offloaded(_two_adapter_model(peft))
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(
            ours.generate(input_ids=TOKENS, **settings), theirs.generate(input_ids=TOKENS, **settings)
        )


def test_a_lora_model_with_a_layer_offloaded_to_disk_computes_what_it_computes_in_memory(tmp_path):
    model = _two_adapter_model(lora_engine)
    with torch.no_grad():
        want = model(input_ids=TOKENS).logits
    placement = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dispatch_model(model.base_model.model, device_map=placement, main_device="cpu", offload_dir=tmp_path)
    with torch.no_grad():
        got = model(input_ids=TOKENS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
