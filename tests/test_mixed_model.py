"""PeftMixedModel: several LoRA adapters active at once; peft 0.21.2's PeftMixedModel with the same two LoRA
adapters (same weights) is the oracle."""

import peft
import pytest
import torch
from conftest import copy_lora_weights

import lora_engine

# Overlapping targets: q_proj holds both adapters, v_proj only the second.
FIRST = dict(target_modules=["q_proj"], init_lora_weights=False)
SECOND = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, init_lora_weights=False)


def build(library, llama_factory):
    model = library.get_peft_model(llama_factory(), library.LoraConfig(**FIRST), mixed=True)
    model.add_adapter("second", library.LoraConfig(**SECOND))
    return model


@pytest.fixture
def pair(llama_factory):
    torch.manual_seed(0)
    theirs = build(peft, llama_factory)
    ours = build(lora_engine, llama_factory)
    copy_lora_weights(theirs, ours)
    return theirs, ours


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_get_peft_model_mixed_returns_a_peft_mixed_model(pair):
    _, ours = pair
    assert type(ours) is lora_engine.PeftMixedModel
    assert not isinstance(ours, lora_engine.PeftModel)


def test_two_active_adapters_equal_peft(pair, input_ids):
    theirs, ours = pair
    theirs.set_adapter(["default", "second"])
    ours.set_adapter(["default", "second"])
    assert ours.active_adapters == ["default", "second"]
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=0, atol=1e-6)


def test_two_active_adapters_differ_from_each_one_alone(pair, input_ids):
    _, ours = pair
    ours.set_adapter(["default", "second"])
    both = logits(ours, input_ids)
    for name in ("default", "second"):
        ours.set_adapter(name)
        assert not torch.allclose(logits(ours, input_ids), both)


@pytest.mark.parametrize("active", ["default", "second"])
def test_one_active_adapter_equals_peft(pair, input_ids, active):
    theirs, ours = pair
    theirs.set_adapter(active)
    ours.set_adapter(active)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=0, atol=1e-6)


def test_disable_adapter_gives_the_base_model(pair, input_ids, llama_factory):
    _, ours = pair
    ours.set_adapter(["default", "second"])
    with ours.disable_adapter():
        torch.testing.assert_close(
            logits(ours, input_ids), logits(llama_factory(), input_ids), rtol=0, atol=0
        )


def test_merge_and_unload_of_both_equals_peft(pair, input_ids):
    theirs, ours = pair
    theirs.set_adapter(["default", "second"])
    ours.set_adapter(["default", "second"])
    merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    torch.testing.assert_close(
        logits(merged_ours, input_ids), logits(merged_theirs, input_ids), rtol=0, atol=1e-5
    )


def test_adapters_saved_by_peft_model_load_into_a_mixed_model_like_peft(llama_factory, tmp_path, input_ids):
    torch.manual_seed(0)
    for name, config in (("first", FIRST), ("second", SECOND)):
        lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**config)).save_pretrained(
            tmp_path / name
        )
    models = []
    for library in (peft, lora_engine):
        model = library.PeftMixedModel.from_pretrained(llama_factory(), tmp_path / "first", "first")
        model.load_adapter(tmp_path / "second", "second")
        model.set_adapter(["first", "second"])
        models.append(model)
    theirs, ours = models
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=0, atol=1e-6)


def test_unknown_adapter_raises_naming_it(pair):
    _, ours = pair
    with pytest.raises(
        ValueError, match=r"Adapter\(s\) \['nope'\] not found, available adapters: \['default', 'second'\]"
    ):
        ours.set_adapter(["default", "nope"])


def test_saving_a_mixed_model_raises_as_in_peft(pair, tmp_path):
    _, ours = pair
    with pytest.raises(NotImplementedError, match="save each adapter from a PeftModel"):
        ours.save_pretrained(tmp_path)
