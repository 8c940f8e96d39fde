"""get_layer_status / get_model_status against peft 0.21.2: the same model in the same state gives the same report,
field by field (adapter names, active, merged, requires_grad, available adapters, devices, module types)."""

import dataclasses

import peft
import pytest

import lora_engine
from lora_engine.status import get_layer_status, get_model_status


def _fields(status) -> dict:
    return dataclasses.asdict(status)


def _build_pair(llama_factory, library):
    """One adapter on embed_tokens + q_proj with a trained lm_head copy, and an inactive second adapter on v_proj."""
    model = library.get_peft_model(
        llama_factory(),
        library.LoraConfig(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    )
    model.add_adapter("other", library.LoraConfig(target_modules=["v_proj"], r=4))
    return model


@pytest.fixture
def pair(llama_factory):
    return _build_pair(llama_factory, peft), _build_pair(llama_factory, lora_engine)


# Each state is reached by the same calls on both models.
STATES = {
    "fresh": lambda model: None,
    "second-active": lambda model: model.set_adapter("other"),
    "merged": lambda model: model.merge_adapter(),
    "both-active": lambda model: model.base_model.set_adapter(["default", "other"]),
}


@pytest.mark.parametrize("state", STATES)
def test_layer_status_fields_equal_peft(pair, state):
    theirs, ours = pair
    STATES[state](theirs)
    STATES[state](ours)
    expected = [_fields(status) for status in theirs.get_layer_status()]
    assert [_fields(status) for status in ours.get_layer_status()] == expected


@pytest.mark.parametrize("state", STATES)
def test_model_status_fields_equal_peft(pair, state):
    theirs, ours = pair
    STATES[state](theirs)
    STATES[state](ours)
    assert _fields(ours.get_model_status()) == _fields(theirs.get_model_status())


def test_status_inside_disable_adapter_reports_disabled_layers(pair):
    theirs, ours = pair
    with theirs.disable_adapter(), ours.disable_adapter():
        assert _fields(ours.get_model_status()) == _fields(theirs.get_model_status())
        assert ours.get_model_status().enabled is False


def test_module_level_functions_on_injected_model_equal_peft(llama_factory):
    config = dict(target_modules=["q_proj", "v_proj"])
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), llama_factory())
    ours = lora_engine.inject_adapter_in_model(lora_engine.LoraConfig(**config), llama_factory())
    assert [_fields(s) for s in get_layer_status(ours)] == [_fields(s) for s in peft.get_layer_status(theirs)]
    assert _fields(get_model_status(ours)) == _fields(peft.get_model_status(theirs))


def test_status_of_a_model_without_adapters_raises_value_error(llama_factory):
    with pytest.raises(ValueError, match="No adapter layers found in the LlamaForCausalLM"):
        get_layer_status(llama_factory())


def test_unknown_attribute_error_names_the_peft_model_and_the_wrapped_model(llama_factory):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AttributeError) as error:
        model.no_such_attribute  # noqa: B018
    message = str(error.value)
    assert message.startswith("'PeftModel' object has no attribute 'no_such_attribute'")
    assert "'LlamaForCausalLM' it wraps" in message
    assert not hasattr(model, "no_such_attribute")


def test_requires_grad_is_irregular_when_one_factor_is_frozen(pair):
    theirs, ours = pair
    for model in pair:
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)
    assert ours.get_model_status().requires_grad["default"] == "irregular"
    assert _fields(ours.get_model_status()) == _fields(theirs.get_model_status())


def test_devices_lists_the_device_type_of_each_adapter(pair):
    _, ours = pair
    assert ours.get_model_status().devices == {"default": ["cpu"], "other": ["cpu"]}
