"""``lora_bias=True`` (a bias on ``lora_B``) with peft 0.21.2 as the oracle: BERT's nn.Linear layers, GPT-2's
Conv1D layers and a convolution, all with base biases; peft's non-trivial adapter (``init_lora_weights=False``,
which leaves ``lora_B.bias`` at its random nn.Linear init) copied into ours."""

import copy

import peft
import pytest
import torch
from conftest import copy_lora_weights
from safetensors.torch import load_file
from torch import nn

import lora_engine

TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
CASES = [
    pytest.param(
        "bert_cls_factory", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}, id="bert"
    ),
    pytest.param(
        "gpt2_factory", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}, id="gpt2-conv1d"
    ),
]


def build_pair(make, **config):
    config = {"init_lora_weights": False, "lora_bias": True, **config}
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(config)))
    ours = lora_engine.get_peft_model(make(), lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def inputs_for(factory, input_ids):
    labels = torch.tensor([0, 2]) if factory.startswith("bert") else input_ids
    return {"input_ids": input_ids, "labels": labels}


def assert_same_state(ours, theirs):
    their_state = theirs.state_dict()
    assert ours.state_dict().keys() == their_state.keys()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], **TOLERANCE, msg=key)


@pytest.mark.parametrize(("factory", "config"), CASES)
def test_lora_bias_trainable_parameters_match_peft(request, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {name for name, param in ours.named_parameters() if param.requires_grad}
    assert trainable == {name for name, param in theirs.named_parameters() if param.requires_grad}
    assert any(name.endswith("lora_B.default.bias") for name in trainable)


@pytest.mark.parametrize(("factory", "config"), CASES)
def test_lora_bias_logits_loss_and_gradients_match_peft(request, input_ids, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    inputs = inputs_for(factory, input_ids)
    their_out, our_out = theirs(**inputs), ours(**inputs)
    torch.testing.assert_close(our_out.logits, their_out.logits, **TOLERANCE)
    their_out.loss.backward()
    our_out.loss.backward()
    their_grads = {name: param.grad for name, param in theirs.named_parameters() if param.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, their_grads[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize(("factory", "config"), CASES)
def test_lora_bias_merge_and_unmerge_equal_peft(request, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    theirs.merge_adapter()
    ours.merge_adapter()
    assert_same_state(ours, theirs)  # base weights and base biases
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    assert_same_state(ours, theirs)


def test_lora_bias_merge_and_unload_logits_equal_unmerged(bert_cls_factory, input_ids):
    _, ours = build_pair(bert_cls_factory, **CASES[0].values[1])
    with torch.no_grad():
        unmerged = ours(input_ids=input_ids).logits
        merged = ours.merge_and_unload()(input_ids=input_ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_bias_adapter_round_trips_through_peft_both_ways(gpt2_factory, tmp_path, input_ids):
    theirs, ours = build_pair(gpt2_factory, **CASES[1].values[1])
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert (
        load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    )
    loaded_by_us = lora_engine.PeftModel.from_pretrained(gpt2_factory(), tmp_path / "peft")
    loaded_by_peft = peft.PeftModel.from_pretrained(gpt2_factory(), tmp_path / "ours")
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
        torch.testing.assert_close(loaded_by_us(input_ids=input_ids).logits, expected, **TOLERANCE)
        torch.testing.assert_close(loaded_by_peft(input_ids=input_ids).logits, expected, **TOLERANCE)


def test_lora_bias_on_a_conv_matches_peft_and_merges():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))

    theirs, ours = build_pair(make, target_modules=["0"], r=2)
    images = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), **TOLERANCE)
    theirs.merge_adapter()
    ours.merge_adapter()
    assert_same_state(ours, theirs)


def test_merging_lora_bias_into_a_base_without_bias_raises_like_peft(llama_factory):
    with pytest.warns(UserWarning, match="has no bias"):
        ours = lora_engine.get_peft_model(
            llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"], lora_bias=True)
        )
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        ours.merge_adapter()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "not supported for DoRA"),
        ({"init_lora_weights": "gaussian"}, "only supported with init_lora_weights=True or False"),
    ],
    ids=["dora", "gaussian-init"],
)
def test_lora_bias_with_an_option_peft_refuses_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        lora_engine.LoraConfig(target_modules=["q_proj"], lora_bias=True, **options)


def test_lora_bias_on_an_embedding_is_refused_naming_it(llama_factory):
    config = lora_engine.LoraConfig(target_modules=["embed_tokens"], lora_bias=True)
    with pytest.raises(ValueError, match=r"lora_bias=True on 'model.embed_tokens' \(Embedding\)"):
        lora_engine.get_peft_model(llama_factory(), config)


def test_lora_bias_in_a_mixed_batch_is_refused(bert_cls_factory, input_ids):
    _, ours = build_pair(bert_cls_factory, **CASES[0].values[1])
    ours.eval()
    with pytest.raises(ValueError, match="lora_bias=True.*mixed-adapter batches"):
        ours(input_ids=input_ids, adapter_names=["default", "__base__"])
