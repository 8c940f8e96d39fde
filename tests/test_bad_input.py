"""Bad input is refused with an error that names the offending module, key, shape or value, and leaves no trace.

Covers: adapters loaded onto the wrong base, unknown adapter names, targets that match nothing, invalid config
values, adapter names that would escape the save folder, interrupted saves, pickled code in ``.bin`` files,
folders without adapter files, and config keys from a newer peft.
"""

import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

import lora_engine
import lora_engine.serialization
from lora_engine import LoraConfig, PeftModel, get_peft_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# Names that are not plain folder names: saving under them could write outside the save folder.
ESCAPING_NAMES = ["../evil", "a/b", "a\\b", "..", ""]


def make_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **overrides})


@pytest.fixture
def peft_model(llama_factory):
    """Our tiny Llama with a ``default`` adapter (random, non-zero weights) on q_proj and v_proj."""
    torch.manual_seed(1)
    return get_peft_model(llama_factory(0), make_config(init_lora_weights=False))


@pytest.fixture
def saved_adapter(peft_model, tmp_path) -> Path:
    """A folder holding ``peft_model``'s adapter, saved as safetensors."""
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder``, relative path → content."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def name_in_message(name: str) -> str:
    """A regex matching ``name`` as the message quotes it (``repr``)."""
    return re.escape(repr(name))


# ---------------------------------------------------------------------------------------------------- wrong base
def test_loading_onto_a_base_of_another_hidden_size_names_the_key_and_both_shapes(llama_factory, tmp_path):
    get_peft_model(llama_factory(0), make_config(target_modules=["q_proj"], r=8)).save_pretrained(tmp_path)
    wider_config = tiny_llama_config()
    wider_config.hidden_size = 48
    wider_base = LlamaForCausalLM(wider_config)

    # Either factor of any q_proj may be reported first; each names the checkpoint shape, then the model's.
    key = r"'base_model\.model\.model\.layers\.\d\.self_attn\.q_proj\.lora_"
    shapes = r"(A\.weight'.*\(8, 32\).*\(8, 48\)|B\.weight'.*\(32, 8\).*\(48, 8\))"
    with pytest.raises(ValueError, match=key + shapes):
        PeftModel.from_pretrained(wider_base, tmp_path)


# ---------------------------------------------------------------------------------------------------- unknown names
def test_set_adapter_with_an_unknown_name_names_it(peft_model):
    with pytest.raises(ValueError, match="missing"):
        peft_model.set_adapter("missing")


def test_delete_adapter_with_an_unknown_name_names_it(peft_model):
    with pytest.raises(ValueError, match="missing"):
        peft_model.delete_adapter("missing")


def test_merge_adapter_with_an_unknown_name_names_it(peft_model):
    with pytest.raises(ValueError, match="missing"):
        peft_model.merge_adapter(adapter_names=["missing"])


def test_save_pretrained_with_an_unknown_selected_adapter_names_it_and_writes_nothing(peft_model, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        peft_model.save_pretrained(tmp_path / "out", selected_adapters=["missing"])

    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- targets
def test_target_modules_that_match_nothing_are_named(llama_factory):
    with pytest.raises(ValueError, match=r"qkv_proj.*attn_out|attn_out.*qkv_proj"):
        get_peft_model(llama_factory(0), make_config(target_modules=["qkv_proj", "attn_out"]))


# ---------------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"r": 0}, "r=0"),
        ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
        ({"bias": "some"}, "bias='some'"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'.*not support"),
        ({"use_qalora": True}, "use_qalora=True.*not support"),
    ],
    ids=["r_zero", "dropout_above_one", "unknown_bias", "lora_ga_init", "qalora"],
)
def test_invalid_config_value_is_refused_naming_field_and_value(overrides, named):
    with pytest.raises(ValueError, match=named):
        make_config(**overrides)


# ---------------------------------------------------------------------------------------------------- escaping names
@contextmanager
def no_new_files(folder: Path):
    """Asserts that ``folder`` (recursively) and its parent hold the same files after the block as before."""
    before = files_under(folder), sorted(os.listdir(folder.parent))
    yield
    assert (files_under(folder), sorted(os.listdir(folder.parent))) == before


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_get_peft_model_refuses_an_adapter_name_that_is_not_a_folder_name(name, llama_factory, tmp_path):
    with no_new_files(tmp_path), pytest.raises(ValueError, match=name_in_message(name)):
        get_peft_model(llama_factory(0), make_config(), adapter_name=name)


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_add_adapter_refuses_an_adapter_name_that_is_not_a_folder_name(name, peft_model, tmp_path):
    with no_new_files(tmp_path), pytest.raises(ValueError, match=name_in_message(name)):
        peft_model.add_adapter(name, make_config())

    assert list(peft_model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_save_pretrained_refuses_an_adapter_name_that_is_not_a_folder_name(name, peft_model, tmp_path):
    with no_new_files(tmp_path), pytest.raises(ValueError, match=name_in_message(name)):
        peft_model.save_pretrained(tmp_path / "out", selected_adapters=[name])


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_load_adapter_refuses_an_adapter_name_that_is_not_a_folder_name(name, peft_model, saved_adapter):
    with no_new_files(saved_adapter.parent), pytest.raises(ValueError, match=name_in_message(name)):
        peft_model.load_adapter(saved_adapter, adapter_name=name)

    assert list(peft_model.peft_config) == ["default"]


# ---------------------------------------------------------------------------------------------------- atomic saves
def test_failed_weight_write_leaves_the_previous_adapter_file_byte_identical(
    peft_model, saved_adapter, monkeypatch
):
    before = files_under(saved_adapter)

    def write_some_bytes_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", write_some_bytes_then_fail)
    monkeypatch.setattr(lora_engine.serialization, "save_file", write_some_bytes_then_fail, raising=False)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)

    with pytest.raises(OSError, match="disk full"):
        peft_model.save_pretrained(saved_adapter)

    assert files_under(saved_adapter) == before  # same files, same bytes: no temporary file left either


# ---------------------------------------------------------------------------------------------------- pickles
class WritesMarkerWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_adapter_with_pickled_code_is_refused_without_running_it(peft_model, tmp_path, llama_factory):
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder, safe_serialization=False)
    marker = tmp_path / "pickle_ran"
    torch.save({"payload": WritesMarkerWhenUnpickled(marker)}, folder / BIN_FILE)

    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Refusing to load .*adapter_model\.bin.*io\.open"):
        PeftModel.from_pretrained(llama_factory(0), folder)

    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- missing files
def test_loading_from_an_empty_folder_names_the_folder(tmp_path, llama_factory):
    folder = tmp_path / "empty_adapter"
    folder.mkdir()

    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        PeftModel.from_pretrained(llama_factory(0), folder)


def test_loading_a_folder_with_a_config_but_no_weights_names_the_folder(saved_adapter, llama_factory):
    (saved_adapter / WEIGHTS_FILE).unlink()

    with pytest.raises(FileNotFoundError, match=re.escape(str(saved_adapter))):
        PeftModel.from_pretrained(llama_factory(0), saved_adapter)


# ---------------------------------------------------------------------------------------------------- newer configs
def test_config_key_from_a_newer_peft_loads_with_a_warning_naming_it(saved_adapter, llama_factory):
    config_path = saved_adapter / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["lora_future_option"] = 1
    config_path.write_text(json.dumps(config))

    with pytest.warns(UserWarning, match="lora_future_option"):
        loaded = PeftModel.from_pretrained(llama_factory(0), saved_adapter)

    assert isinstance(loaded, lora_engine.PeftModelForCausalLM)
