"""A failed load changes nothing; loading over an existing adapter name is explicit; adapter names are safe.

"Nothing" is checked in full (``model_fingerprint``): module types, requires_grad flags, parameter values,
train/eval modes, the adapters, the active adapter, and the logits.
"""

import pytest
import torch
from reliability_helpers import (
    adapter_version,
    as_peft_saved,
    assert_same_fingerprint,
    edit_config,
    load_logits,
    logits,
    model_fingerprint,
    tiny_llama,
)

from lora_engine import LoraConfig, PeftModel, get_peft_model


@pytest.fixture
def wider_adapter(tmp_path):
    """An adapter trained on a tiny Llama of hidden size 48, which does not fit the usual 32."""
    folder = tmp_path / "wider"
    get_peft_model(tiny_llama(hidden_size=48), LoraConfig(target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_load_adapter_trained_on_another_base_raises_and_leaves_the_model_as_it_was(wider_adapter):
    model = adapter_version(0)
    model.train()
    before = model_fingerprint(model)

    with pytest.raises(ValueError, match="q_proj"):
        model.load_adapter(wider_adapter, "x")

    assert "x" not in model.peft_config
    assert_same_fingerprint(before, model_fingerprint(model))


def test_from_pretrained_onto_the_wrong_base_raises_and_leaves_no_wrapper_in_the_callers_model(wider_adapter):
    base = tiny_llama()
    base.train()
    before = model_fingerprint(base)

    with pytest.raises(ValueError, match="q_proj"):
        PeftModel.from_pretrained(base, wider_adapter)

    assert_same_fingerprint(before, model_fingerprint(base))


def test_load_adapter_that_fails_after_injection_leaves_the_model_as_it_was(tmp_path):
    # Same shapes, so every check before injection passes; a key for the base weight fails the copy.
    adapter_version(0).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = adapter_version(1)
    before = model_fingerprint(model)

    with pytest.raises(ValueError, match=r"model\.norm\.weight.*overwrite the base"):
        model.load_adapter(tmp_path, "x")

    assert_same_fingerprint(before, model_fingerprint(model))


def _adapter_with_alpha(folder, lora_alpha: float) -> None:
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=lora_alpha, init_lora_weights=False
    )
    torch.manual_seed(7)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)


def test_loading_an_existing_adapter_name_with_another_config_is_an_error_naming_it(tmp_path):
    _adapter_with_alpha(tmp_path / "alpha8", 8)
    _adapter_with_alpha(tmp_path / "alpha64", 64)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "alpha8", adapter_name="mine")
    before = model_fingerprint(model)

    with pytest.raises(ValueError, match="'mine' already exists.*replace_existing=True"):
        model.load_adapter(tmp_path / "alpha64", "mine")

    assert_same_fingerprint(before, model_fingerprint(model))


def test_replace_existing_loads_the_new_config_and_weights_and_keeps_the_adapter_active(tmp_path):
    _adapter_with_alpha(tmp_path / "alpha8", 8)
    _adapter_with_alpha(tmp_path / "alpha64", 64)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "alpha8")

    model.load_adapter(tmp_path / "alpha64", "default", replace_existing=True)

    assert model.peft_config["default"].lora_alpha == 64
    assert model.active_adapters == ["default"]
    assert torch.allclose(logits(model), load_logits(tmp_path / "alpha64"), atol=1e-6, rtol=0)


def test_reloading_an_adapter_with_the_same_config_replaces_its_weights_as_peft_does(tmp_path):
    adapter_version(0).save_pretrained(tmp_path / "v0")
    retrained = adapter_version(0)
    with torch.no_grad():
        for name, param in retrained.named_parameters():
            if "lora_B" in name:
                param.mul_(3)
    retrained.save_pretrained(tmp_path / "retrained")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "v0")

    model.load_adapter(tmp_path / "retrained", "default")

    assert torch.allclose(logits(model), logits(retrained), atol=1e-6, rtol=0)


def test_a_failed_replacement_keeps_the_old_adapter(tmp_path, wider_adapter):
    model = PeftModel.from_pretrained(tiny_llama(), adapter_version(0).save_pretrained(tmp_path) or tmp_path)
    before = model_fingerprint(model)

    with pytest.raises(ValueError, match="q_proj"):
        model.load_adapter(wider_adapter, "default", replace_existing=True)

    assert_same_fingerprint(before, model_fingerprint(model))


@pytest.mark.parametrize("name", ["__base__", "a\nb", "\u202eevil", "tab\there", "zero\u200bwidth"])
def test_add_adapter_refuses_reserved_and_unprintable_names(name):
    model = adapter_version(0)

    with pytest.raises(ValueError, match=r"reserved|non-printable"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))

    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["__base__", "\u202eevil"])
def test_load_adapter_refuses_reserved_and_unprintable_names(name, tmp_path):
    adapter_version(0).save_pretrained(tmp_path)
    model = adapter_version(1)

    with pytest.raises(ValueError, match=r"reserved|non-printable"):
        model.load_adapter(tmp_path, name)


@pytest.mark.parametrize("selected", [[["default"]], [0], "default"], ids=["nested_list", "int", "str"])
def test_save_pretrained_with_selected_adapters_that_are_not_names_says_so(selected, tmp_path):
    with pytest.raises(TypeError, match="selected_adapters"):
        adapter_version(0).save_pretrained(tmp_path, selected_adapters=selected)

    assert not any(tmp_path.iterdir())


def test_config_with_a_bool_flag_written_as_a_number_is_refused_naming_the_field(tmp_path):
    adapter_version(0).save_pretrained(tmp_path)
    edit_config(as_peft_saved(tmp_path), use_rslora=1)

    with pytest.raises(ValueError, match=r"adapter_config\.json.*use_rslora=1"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_the_reserved_adapter_name_is_the_one_mixed_batches_route_to_the_base():
    from lora_engine.layers.routing import BASE_ONLY
    from lora_engine.peft_format import BASE_ONLY_NAME

    assert BASE_ONLY_NAME == BASE_ONLY == "__base__"
