"""peft parameters lora_engine accepts but ignores (``low_cpu_mem_usage``, ``ephemeral_gpu_offload``,
``task_ids``): passing anything but the default warns that it has no effect, the default stays silent, and the
call does exactly what it does without the parameter."""

import warnings

import pytest
import torch

import lora_engine
from lora_engine import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model

QV = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _model(llama_factory, task_type=None):
    torch.manual_seed(0)
    return get_peft_model(llama_factory(0), LoraConfig(**QV, task_type=task_type))


@pytest.fixture
def saved_adapter(llama_factory, tmp_path):
    folder = tmp_path / "adapter"
    _model(llama_factory).save_pretrained(folder)
    return folder


def _calls(llama_factory, saved_adapter):
    """call name → the call, taking the ignored parameter's value."""
    return {
        "get_peft_model(low_cpu_mem_usage)": lambda value: get_peft_model(
            llama_factory(0), LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=value
        ),
        "PeftModel(low_cpu_mem_usage)": lambda value: PeftModel(
            llama_factory(0), LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=value
        ),
        "add_adapter(low_cpu_mem_usage)": lambda value: _model(llama_factory).add_adapter(
            "other", LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=value
        ),
        "inject_adapter_in_model(low_cpu_mem_usage)": lambda value: inject_adapter_in_model(
            LoraConfig(r=4, target_modules=["q_proj"]), llama_factory(0), low_cpu_mem_usage=value
        ),
        "from_pretrained(low_cpu_mem_usage)": lambda value: PeftModel.from_pretrained(
            llama_factory(0), saved_adapter, low_cpu_mem_usage=value
        ),
        "from_pretrained(ephemeral_gpu_offload)": lambda value: PeftModel.from_pretrained(
            llama_factory(0), saved_adapter, ephemeral_gpu_offload=value
        ),
        "load_adapter(low_cpu_mem_usage)": lambda value: _model(llama_factory).load_adapter(
            saved_adapter, "other", low_cpu_mem_usage=value
        ),
        "load_adapter(ephemeral_gpu_offload)": lambda value: _model(llama_factory).load_adapter(
            saved_adapter, "other", ephemeral_gpu_offload=value
        ),
    }


CALLS = [
    "get_peft_model(low_cpu_mem_usage)",
    "PeftModel(low_cpu_mem_usage)",
    "add_adapter(low_cpu_mem_usage)",
    "inject_adapter_in_model(low_cpu_mem_usage)",
    "from_pretrained(low_cpu_mem_usage)",
    "from_pretrained(ephemeral_gpu_offload)",
    "load_adapter(low_cpu_mem_usage)",
    "load_adapter(ephemeral_gpu_offload)",
]


def _no_effect_warnings(caught) -> list[str]:
    return [
        str(warning.message) for warning in caught if "has no effect in lora_engine" in str(warning.message)
    ]


@pytest.mark.parametrize("call", CALLS)
def test_ignored_option_set_warns_that_it_has_no_effect(call, llama_factory, saved_adapter):
    option = call[call.index("(") + 1 : -1]
    with pytest.warns(UserWarning, match=rf"{option}=True has no effect in lora_engine: peft uses it"):
        _calls(llama_factory, saved_adapter)[call](True)


@pytest.mark.parametrize("call", CALLS)
def test_ignored_option_at_its_default_is_silent(call, llama_factory, saved_adapter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(llama_factory, saved_adapter)[call](False)
    assert not _no_effect_warnings(caught)


def test_low_cpu_mem_usage_leaves_the_wrapped_model_as_without_it(llama_factory):
    config = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": False}
    torch.manual_seed(0)
    plain = get_peft_model(llama_factory(0), LoraConfig(**config)).state_dict()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="has no effect"):
        flagged = get_peft_model(llama_factory(0), LoraConfig(**config), low_cpu_mem_usage=True).state_dict()
    assert plain.keys() == flagged.keys()
    assert all(torch.equal(plain[key], flagged[key]) for key in plain)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"], ids=["PeftModel", "PeftModelForCausalLM"])
def test_forward_with_task_ids_warns_and_returns_the_same_logits(task_type, llama_factory, input_ids):
    model = _model(llama_factory, task_type)
    assert isinstance(model, lora_engine.PeftModelForCausalLM) == (task_type == "CAUSAL_LM")
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        with pytest.warns(UserWarning, match=r"task_ids=tensor\(\[0, 1\]\) has no effect in lora_engine"):
            logits = model(input_ids=input_ids, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_forward_without_task_ids_is_silent(llama_factory, input_ids):
    model = _model(llama_factory, "CAUSAL_LM")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=input_ids)
    assert not _no_effect_warnings(caught)
