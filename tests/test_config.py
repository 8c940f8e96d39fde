"""LoraConfig and adapter_config.json, with peft 0.21.2 as the oracle for fields, defaults and file format."""

import json
import os
import warnings

import peft
import pytest

from lora_engine.config import LoraConfig, PeftConfig, PeftType, TaskType
from lora_engine.peft_format import CONFIG_NAME, PEFT_FORMAT_VERSION

# A config that sets every field lora_engine supports away from its default.
NON_DEFAULT_FIELDS = {
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "some/base-model",
    "revision": "main",
    "inference_mode": True,
    "r": 16,
    "target_modules": ["v_proj", "q_proj", "k_proj"],
    "exclude_modules": ["lm_head"],
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "fan_in_fan_out": True,
    "bias": "lora_only",
    "use_rslora": True,
    "modules_to_save": ["score"],
    "init_lora_weights": "gaussian",
    "layers_to_transform": [0, 1],
    "layers_pattern": "layers",
    "rank_pattern": {"q_proj": 4},
    "alpha_pattern": {"v_proj": 2.5},
    "megatron_core": "my.megatron",
    "qalora_group_size": 32,
    "ensure_weight_tying": True,
}


def peft_dict(config: peft.LoraConfig) -> dict:
    """peft's `to_dict()` in our representation: sets as sorted lists, enums as str, via JSON."""
    config_dict = {
        key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()
    }
    return json.loads(json.dumps(config_dict))


def saved_dict(folder) -> dict:
    with open(os.path.join(folder, CONFIG_NAME)) as file:
        return json.load(file)


def test_enums_have_peft_values():
    assert PeftType.LORA.value == peft.PeftType.LORA.value
    assert {task.name: task.value for task in TaskType} == {task.name: task.value for task in peft.TaskType}


def test_format_version_is_the_installed_oracle_peft():
    assert PEFT_FORMAT_VERSION == peft.__version__ == "0.21.2"


def test_defaults_equal_peft_defaults():
    assert LoraConfig().to_dict() == peft_dict(peft.LoraConfig())


def test_to_dict_keys_equal_peft_keys_and_omit_runtime_config():
    keys = set(LoraConfig().to_dict())
    assert keys == set(peft.LoraConfig().to_dict())
    assert "runtime_config" not in keys


def test_non_default_fields_to_dict_equals_peft():
    assert LoraConfig(**NON_DEFAULT_FIELDS).to_dict() == peft_dict(peft.LoraConfig(**NON_DEFAULT_FIELDS))


def test_to_dict_is_json_plain_with_sorted_sets_and_str_enums():
    config_dict = LoraConfig(target_modules=["v_proj", "q_proj"], task_type="SEQ_CLS").to_dict()
    assert config_dict["target_modules"] == ["q_proj", "v_proj"]
    assert type(config_dict["task_type"]) is str and config_dict["task_type"] == "SEQ_CLS"
    assert type(config_dict["peft_type"]) is str and config_dict["peft_type"] == "LORA"


def test_list_and_tuple_module_names_become_sets():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=("lm_head",))
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.exclude_modules == {"lm_head"}


def test_str_target_modules_stays_a_regex_str():
    assert LoraConfig(target_modules=".*q_proj").target_modules == ".*q_proj"


def test_str_task_type_becomes_task_type_enum():
    assert LoraConfig(task_type="CAUSAL_LM").task_type is TaskType.CAUSAL_LM


def test_peft_type_is_always_lora():
    assert LoraConfig().peft_type is PeftType.LORA
    assert LoraConfig(peft_type="LORA").peft_type is PeftType.LORA


def test_is_not_prompt_learning():
    assert LoraConfig().is_prompt_learning is False


def test_saved_keys_equal_the_keys_peft_saves(tmp_path):
    LoraConfig(**NON_DEFAULT_FIELDS).save_pretrained(tmp_path / "ours")
    peft.LoraConfig(**NON_DEFAULT_FIELDS).save_pretrained(tmp_path / "peft")
    assert set(saved_dict(tmp_path / "ours")) == set(saved_dict(tmp_path / "peft"))


def test_saved_file_is_sorted_indented_json_of_to_dict(tmp_path):
    config = LoraConfig(**NON_DEFAULT_FIELDS)
    config.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert text == json.dumps(config.to_dict(), indent=2, sort_keys=True)


def test_save_creates_missing_folders(tmp_path):
    LoraConfig().save_pretrained(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / CONFIG_NAME).is_file()


def test_save_writes_auto_mapping_dict_like_peft(tmp_path):
    auto_mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"}
    LoraConfig().save_pretrained(tmp_path / "ours", auto_mapping_dict=auto_mapping)
    peft.LoraConfig().save_pretrained(tmp_path / "peft", auto_mapping_dict=auto_mapping)
    assert saved_dict(tmp_path / "ours")["auto_mapping"] == saved_dict(tmp_path / "peft")["auto_mapping"]


def test_peft_loads_our_file_with_equal_values_and_no_warning(tmp_path):
    LoraConfig(**NON_DEFAULT_FIELDS).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert peft_dict(loaded) == peft_dict(peft.LoraConfig(**NON_DEFAULT_FIELDS))


def test_we_load_peft_file_with_equal_values_and_no_warning(tmp_path):
    peft.LoraConfig(**NON_DEFAULT_FIELDS).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded == LoraConfig(**NON_DEFAULT_FIELDS)


def test_our_round_trip_gives_an_equal_config(tmp_path):
    config = LoraConfig(**NON_DEFAULT_FIELDS)
    config.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == config


def test_peft_config_from_pretrained_returns_lora_config(tmp_path):
    peft.LoraConfig(r=4).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoraConfig
    assert loaded.r == 4


def test_from_pretrained_reads_subfolder(tmp_path):
    LoraConfig(r=2).save_pretrained(tmp_path / "other")
    assert LoraConfig.from_pretrained(tmp_path, subfolder="other").r == 2


def test_from_pretrained_keywords_override_loaded_fields(tmp_path):
    LoraConfig(r=2, inference_mode=True).save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path, inference_mode=False, r=4)
    assert (loaded.inference_mode, loaded.r) == (False, 4)


def test_from_pretrained_refuses_a_keyword_that_is_not_a_field(tmp_path):
    LoraConfig().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="token"):
        LoraConfig.from_pretrained(tmp_path, token="secret")


def test_from_pretrained_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LoraConfig.from_pretrained(missing)


def test_from_pretrained_missing_file_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path.name}.*{CONFIG_NAME}"):
        LoraConfig.from_pretrained(tmp_path)


def test_unknown_key_loads_with_a_warning_naming_it(tmp_path):
    config_dict = {**LoraConfig(r=4).to_dict(), "use_future_trick": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config_dict))
    with pytest.warns(UserWarning, match="use_future_trick"):
        loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded == LoraConfig(r=4)


def test_runtime_config_key_is_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="runtime_config"):
        loaded = LoraConfig.from_dict({"r": 4, "runtime_config": {"ephemeral_gpu_offload": False}})
    assert loaded == LoraConfig(r=4)


def test_from_dict_does_not_mutate_its_argument():
    config_dict = {"peft_type": "LORA", "target_modules": ["q_proj"], "runtime_config": {}}
    with pytest.warns(UserWarning):
        PeftConfig.from_dict(config_dict)
    assert config_dict == {"peft_type": "LORA", "target_modules": ["q_proj"], "runtime_config": {}}


def test_from_dict_refuses_another_peft_type_naming_it():
    with pytest.raises(ValueError, match="'IA3'.*only supports peft_type 'LORA'"):
        PeftConfig.from_dict({"peft_type": "IA3", "target_modules": ["q_proj"]})


def test_peft_config_from_dict_without_peft_type_is_refused():
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_dict({"r": 4})


def test_failed_serialisation_leaves_existing_file_and_no_temporary(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    broken = LoraConfig(r=8)
    broken.base_model_name_or_path = object()
    with pytest.raises(TypeError, match="not JSON serializable"):
        broken.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [CONFIG_NAME]


def test_failed_replace_leaves_existing_file_and_no_temporary(tmp_path, monkeypatch):
    LoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(r=8).save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [CONFIG_NAME]


INVALID_VALUES = [
    ("r", 0),
    ("r", -4),
    ("r", 2.5),
    ("r", "8"),
    ("r", True),
    ("lora_alpha", "16"),
    ("lora_alpha", None),
    ("lora_alpha", float("inf")),
    ("lora_dropout", 1.0),
    ("lora_dropout", -0.1),
    ("lora_dropout", "0.1"),
    ("bias", "some"),
    ("task_type", "CAUSAL"),
]


@pytest.mark.parametrize(("name", "value"), INVALID_VALUES)
def test_invalid_value_is_refused_naming_field_and_value(name, value):
    with pytest.raises(ValueError) as error:
        LoraConfig(**{name: value})
    assert f"{name}={value!r}" in str(error.value)


def test_invalid_task_type_message_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'CAUSAL_LM'.*'FEATURE_EXTRACTION'"):
        LoraConfig(task_type="causal_lm")


PEFT_ONLY_INITS = ["lora_ga", "mica"]


@pytest.mark.parametrize("init", PEFT_ONLY_INITS)
def test_peft_only_init_is_refused_as_not_supported_yet(init):
    with pytest.raises(ValueError, match="peft option that lora_engine does not support yet") as error:
        LoraConfig(init_lora_weights=init)
    assert f"init_lora_weights={init!r}" in str(error.value)


@pytest.mark.parametrize("init", ["xavier", "pissa_niter_x", 1, None])
def test_unknown_init_is_refused_as_unknown(init):
    with pytest.raises(ValueError, match="is unknown") as error:
        LoraConfig(init_lora_weights=init)
    assert f"init_lora_weights={init!r}" in str(error.value)


@pytest.mark.parametrize(
    "init", [True, False, "gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal", "eva", "corda"]
)
def test_supported_init_is_accepted(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize(("name", "value"), [("layers_to_transform", [0]), ("layers_pattern", "layers")])
def test_layer_selection_is_refused_with_str_target_modules(name, value):
    with pytest.raises(ValueError, match="str \\(regex\\) target_modules='.\\*q_proj'") as error:
        LoraConfig(target_modules=".*q_proj", **{name: value})
    assert f"{name}={value!r}" in str(error.value)


def test_layers_pattern_without_layers_to_transform_is_refused():
    with pytest.raises(ValueError, match="layers_pattern='layers' needs layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


UNSUPPORTED_OPTIONS = [
    ("use_qalora", True),
    ("layer_replication", [[0, 2], [1, 2]]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {}),
    ("velora_config", {}),
    ("monteclora_config", {"num_samples": 4}),
    ("use_bdlora", {}),
    ("alora_invocation_tokens", [5, 6]),
    ("lora_ga_config", {"direction": "ArB2r"}),
]


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED_OPTIONS)
def test_unsupported_peft_option_is_refused_naming_field_and_value(name, value):
    with pytest.raises(ValueError, match="not supported yet by lora_engine") as error:
        LoraConfig(**{name: value})
    assert f"{name}={value!r}" in str(error.value)
