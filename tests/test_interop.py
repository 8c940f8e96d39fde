"""Adapter folders move between peft 0.21.2 and lora_engine in both directions, with peft as the oracle.

For each case the same base (same seed) gets the same LoRA weights in both libraries (built by peft with
``init_lora_weights=False``, copied into ours); then a folder saved by either loads in the other with the same
logits, and the two libraries write the same files: safetensors keys, shapes, dtypes, values and metadata, and
``adapter_config.json`` keys and values.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from conftest import copy_lora_weights
from safetensors import safe_open

import lora_engine
from lora_engine.file_checks import bound_config_digest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# Config keys whose list order peft leaves arbitrary (they are sets in memory), and the one that names the writer.
SET_VALUED_KEYS = ("target_modules", "exclude_modules")
WRITER_KEYS = ("peft_version",)


@dataclass(frozen=True)
class Case:
    """One adapter setup, applied identically in peft and lora_engine."""

    id: str
    config: dict
    factory: str = "llama_factory"
    adapter_name: str = "default"
    dtype: torch.dtype = torch.float32


ATTENTION = ["q_proj", "v_proj"]
CASES = [
    Case("default_adapter", dict(target_modules=ATTENTION, task_type="CAUSAL_LM")),
    Case("named_adapter", dict(target_modules=ATTENTION, task_type="CAUSAL_LM"), adapter_name="other"),
    Case(
        "modules_to_save_lm_head",
        dict(target_modules=ATTENTION, modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    ),
    Case("embedding_targeted", dict(target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM")),
    Case(
        "rslora", dict(target_modules=ATTENTION, r=4, lora_alpha=16, use_rslora=True, task_type="CAUSAL_LM")
    ),
    Case(
        "rank_and_alpha_pattern",
        dict(
            target_modules=ATTENTION,
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"v_proj": 3},
            task_type="CAUSAL_LM",
        ),
    ),
    Case(
        "gpt2_conv1d",
        dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
        "gpt2_factory",
    ),
    Case("bert_seq_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS"), "bert_cls_factory"),
    Case("bf16_base", dict(target_modules=ATTENTION, task_type="CAUSAL_LM"), dtype=torch.bfloat16),
    Case("no_task_type", dict(target_modules=ATTENTION, task_type=None)),
]

CASE = {case.id: case for case in CASES}


# ---------------------------------------------------------------------------------------------------- helpers
def adapter_folder(root: Path, adapter_name: str) -> Path:
    """peft's layout: ``default`` at the root, any other adapter in ``root/<name>``."""
    return root if adapter_name == "default" else root / adapter_name


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def build_pair(factory, case: Case):
    """``(peft model, lora_engine model)`` with identical base and adapter weights; copies to save perturbed."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        factory(0, case.dtype),
        peft.LoraConfig(init_lora_weights=False, **copy.deepcopy(case.config)),
        adapter_name=case.adapter_name,
    )
    perturb_modules_to_save(theirs)
    ours = lora_engine.get_peft_model(
        factory(0, case.dtype),
        lora_engine.LoraConfig(init_lora_weights=False, **copy.deepcopy(case.config)),
        adapter_name=case.adapter_name,
    )
    copy_lora_weights(theirs, ours)
    return theirs, ours


def perturb_modules_to_save(peft_model) -> None:
    """Make the trained copies differ from the base, so that a copy lost on load changes the logits."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name:
                noise = torch.randn(param.shape, generator=generator)
                param.add_(0.1 * noise.to(param.dtype))


def read_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as file:
        return file.metadata(), {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118


def read_config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_FILE).read_text())


def comparable_config(config: dict) -> dict:
    """The config without the writer's version, set-valued lists as sets."""
    config = {key: value for key, value in config.items() if key not in WRITER_KEYS}
    for key in SET_VALUED_KEYS:
        if isinstance(config.get(key), list):
            config[key] = set(config[key])
    return config


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].shape == tensor.shape, key
        assert ours[key].dtype == tensor.dtype, key
        assert torch.equal(ours[key], tensor), key


def assert_same_adapter_files(ours_folder: Path, theirs_folder: Path) -> None:
    ours_metadata, ours_tensors = read_safetensors(ours_folder / WEIGHTS_FILE)
    theirs_metadata, theirs_tensors = read_safetensors(theirs_folder / WEIGHTS_FILE)
    # Ours adds one key binding the weights to their config (serialization's docstring); peft ignores it.
    assert theirs_metadata == {"format": "pt"}
    assert ours_metadata == {
        "format": "pt",
        "lora_engine_config_sha256": bound_config_digest(read_config(ours_folder)),
    }
    assert_same_tensors(ours_tensors, theirs_tensors)
    ours_config, theirs_config = read_config(ours_folder), read_config(theirs_folder)
    assert set(ours_config) == set(theirs_config)
    assert comparable_config(ours_config) == comparable_config(theirs_config)


def adapter_files(root: Path) -> set[str]:
    """Every file under ``root`` except peft's model card, as relative paths."""
    return {
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.name != "README.md"
    }


# ---------------------------------------------------------------------------------------------------- per case
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_adapter_saved_by_peft_loads_in_lora_engine_with_peft_logits(case, request, tmp_path, input_ids):
    factory = request.getfixturevalue(case.factory)
    theirs, _ = build_pair(factory, case)
    theirs.save_pretrained(tmp_path)

    loaded = lora_engine.PeftModel.from_pretrained(
        factory(0, case.dtype), adapter_folder(tmp_path, case.adapter_name), adapter_name=case.adapter_name
    )

    assert_same_logits(logits_of(loaded, input_ids), logits_of(theirs, input_ids), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_adapter_saved_by_lora_engine_loads_in_peft_with_our_logits(case, request, tmp_path, input_ids):
    factory = request.getfixturevalue(case.factory)
    _, ours = build_pair(factory, case)
    ours.save_pretrained(tmp_path)

    loaded = peft.PeftModel.from_pretrained(
        factory(0, case.dtype), adapter_folder(tmp_path, case.adapter_name), adapter_name=case.adapter_name
    )

    assert_same_logits(logits_of(loaded, input_ids), logits_of(ours, input_ids), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_saved_files_equal_peft_files_for_the_same_adapter(case, request, tmp_path):
    theirs, ours = build_pair(request.getfixturevalue(case.factory), case)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")

    assert adapter_files(tmp_path / "ours") == adapter_files(tmp_path / "peft")
    assert_same_adapter_files(
        adapter_folder(tmp_path / "ours", case.adapter_name),
        adapter_folder(tmp_path / "peft", case.adapter_name),
    )


# ---------------------------------------------------------------------------------------------------- dtypes
def test_bf16_base_saves_lora_factors_as_fp32(llama_factory, tmp_path):
    _, ours = build_pair(llama_factory, Case("bf16", dict(target_modules=ATTENTION), dtype=torch.bfloat16))
    ours.save_pretrained(tmp_path)

    _, tensors = read_safetensors(tmp_path / WEIGHTS_FILE)

    assert tensors
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}


def test_task_type_none_writes_the_base_class_as_auto_mapping(llama_factory, tmp_path):
    _, ours = build_pair(llama_factory, Case("none", dict(target_modules=ATTENTION, task_type=None)))
    ours.save_pretrained(tmp_path)

    assert read_config(tmp_path)["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }


def test_embedding_targeted_saves_the_full_embedding_weight(llama_factory, tmp_path):
    _, ours = build_pair(llama_factory, CASE["embedding_targeted"])
    ours.save_pretrained(tmp_path)

    _, tensors = read_safetensors(tmp_path / WEIGHTS_FILE)

    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors
    assert {"lora_embedding_A", "lora_embedding_B"} <= {key.rsplit(".", 1)[-1] for key in tensors}


# ---------------------------------------------------------------------------------------------------- several adapters
def build_two_adapter_pair(factory):
    """Both libraries with ``default`` on q/v and ``other`` on k, the same weights, ``default`` active."""
    theirs, ours = build_pair(factory, CASE["default_adapter"])
    other = dict(target_modules=["k_proj"], r=4, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    theirs.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **other))
    ours.add_adapter("other", lora_engine.LoraConfig(init_lora_weights=False, **other))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def test_two_adapters_are_saved_in_peft_folder_layout(llama_factory, tmp_path):
    theirs, ours = build_two_adapter_pair(llama_factory)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")

    assert adapter_files(tmp_path / "ours") == adapter_files(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours" / "other", tmp_path / "peft" / "other")


def test_selected_adapters_writes_only_those_adapters(llama_factory, tmp_path):
    theirs, ours = build_two_adapter_pair(llama_factory)
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["other"])
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["other"])

    assert adapter_files(tmp_path / "ours") == adapter_files(tmp_path / "peft")
    assert adapter_files(tmp_path / "ours") == {f"other/{CONFIG_FILE}", f"other/{WEIGHTS_FILE}"}


def test_selected_adapters_with_an_unknown_name_raises_value_error_as_peft_does(llama_factory, tmp_path):
    theirs, ours = build_two_adapter_pair(llama_factory)

    with pytest.raises(ValueError):
        theirs.save_pretrained(tmp_path / "peft", selected_adapters=["missing"])
    with pytest.raises(ValueError):
        ours.save_pretrained(tmp_path / "ours", selected_adapters=["missing"])


def test_second_adapter_saved_by_peft_loads_with_load_adapter_and_set_adapter(
    llama_factory, tmp_path, input_ids
):
    theirs, _ = build_two_adapter_pair(llama_factory)
    theirs.save_pretrained(tmp_path)
    theirs.set_adapter("other")

    loaded = lora_engine.PeftModel.from_pretrained(llama_factory(0), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")

    assert_same_logits(logits_of(loaded, input_ids), logits_of(theirs, input_ids), torch.float32)


def test_second_adapter_saved_by_lora_engine_loads_in_peft_with_load_adapter(
    llama_factory, tmp_path, input_ids
):
    _, ours = build_two_adapter_pair(llama_factory)
    ours.save_pretrained(tmp_path)
    ours.set_adapter("other")

    loaded = peft.PeftModel.from_pretrained(llama_factory(0), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")

    assert_same_logits(logits_of(loaded, input_ids), logits_of(ours, input_ids), torch.float32)


# ---------------------------------------------------------------------------------------------------- .bin files
def test_bin_adapter_saved_by_peft_loads_in_lora_engine(llama_factory, tmp_path, input_ids):
    theirs, _ = build_pair(llama_factory, CASE["modules_to_save_lm_head"])
    theirs.save_pretrained(tmp_path, safe_serialization=False)

    loaded = lora_engine.PeftModel.from_pretrained(llama_factory(0), tmp_path)

    assert (tmp_path / BIN_FILE).is_file()
    assert_same_logits(logits_of(loaded, input_ids), logits_of(theirs, input_ids), torch.float32)


def test_bin_adapter_saved_by_lora_engine_loads_in_peft(llama_factory, tmp_path, input_ids):
    _, ours = build_pair(llama_factory, CASE["modules_to_save_lm_head"])
    ours.save_pretrained(tmp_path, safe_serialization=False)

    loaded = peft.PeftModel.from_pretrained(llama_factory(0), tmp_path)

    assert (tmp_path / BIN_FILE).is_file()
    assert not (tmp_path / WEIGHTS_FILE).exists()
    assert_same_logits(logits_of(loaded, input_ids), logits_of(ours, input_ids), torch.float32)


def test_bin_adapter_holds_the_same_tensors_as_peft_bin(llama_factory, tmp_path):
    theirs, ours = build_pair(llama_factory, CASE["modules_to_save_lm_head"])
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)

    ours_tensors = torch.load(tmp_path / "ours" / BIN_FILE, weights_only=True)
    theirs_tensors = torch.load(tmp_path / "peft" / BIN_FILE, weights_only=True)

    assert_same_tensors(ours_tensors, theirs_tensors)


# ---------------------------------------------------------------------------------------------------- from_pretrained
def test_from_pretrained_reads_a_subfolder_saved_by_peft(llama_factory, tmp_path, input_ids):
    theirs, _ = build_pair(llama_factory, CASE["default_adapter"])
    theirs.save_pretrained(tmp_path / "checkpoint")

    loaded = lora_engine.PeftModel.from_pretrained(llama_factory(0), tmp_path, subfolder="checkpoint")

    assert_same_logits(logits_of(loaded, input_ids), logits_of(theirs, input_ids), torch.float32)


def test_peft_reads_a_subfolder_saved_by_lora_engine(llama_factory, tmp_path, input_ids):
    _, ours = build_pair(llama_factory, CASE["default_adapter"])
    ours.save_pretrained(tmp_path / "checkpoint")

    loaded = peft.PeftModel.from_pretrained(llama_factory(0), tmp_path, subfolder="checkpoint")

    assert_same_logits(logits_of(loaded, input_ids), logits_of(ours, input_ids), torch.float32)


def test_from_pretrained_picks_the_causal_lm_class_from_task_type_like_peft(llama_factory, tmp_path):
    theirs, ours = build_pair(llama_factory, CASE["default_adapter"])
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")

    assert type(lora_engine.PeftModel.from_pretrained(llama_factory(0), tmp_path / "peft")) is (
        lora_engine.PeftModelForCausalLM
    )
    assert (
        type(peft.PeftModel.from_pretrained(llama_factory(0), tmp_path / "ours")) is peft.PeftModelForCausalLM
    )


# ---------------------------------------------------------------------------------------------------- state dicts
STATE_DICT_CASES = [
    CASE["default_adapter"],
    CASE["named_adapter"],
    CASE["modules_to_save_lm_head"],
    CASE["embedding_targeted"],
    CASE["bert_seq_cls"],
]


@pytest.mark.parametrize("case", STATE_DICT_CASES, ids=[case.id for case in STATE_DICT_CASES])
def test_get_peft_model_state_dict_equals_peft(case, request):
    theirs, ours = build_pair(request.getfixturevalue(case.factory), case)

    assert_same_tensors(
        lora_engine.get_peft_model_state_dict(ours, adapter_name=case.adapter_name),
        peft.get_peft_model_state_dict(theirs, adapter_name=case.adapter_name),
    )


@pytest.mark.parametrize("case", STATE_DICT_CASES, ids=[case.id for case in STATE_DICT_CASES])
def test_set_peft_model_state_dict_loads_peft_state_dict(case, request, input_ids):
    factory = request.getfixturevalue(case.factory)
    theirs, _ = build_pair(factory, case)
    torch.manual_seed(4)  # fresh adapter weights that differ from peft's until loaded
    fresh = lora_engine.get_peft_model(
        factory(0),
        lora_engine.LoraConfig(init_lora_weights=False, **copy.deepcopy(case.config)),
        case.adapter_name,
    )

    result = lora_engine.set_peft_model_state_dict(
        fresh,
        peft.get_peft_model_state_dict(theirs, adapter_name=case.adapter_name),
        adapter_name=case.adapter_name,
    )

    assert result.unexpected_keys == []
    assert_same_tensors(fresh.state_dict(), theirs.state_dict())
    assert_same_logits(logits_of(fresh, input_ids), logits_of(theirs, input_ids), torch.float32)


INJECTED_CONFIG = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])


def inject(library, factory, seed: int):
    """A plain model (no PeftModel wrapper, so no ``base_model.model.`` prefix) with adapter weights from ``seed``."""
    torch.manual_seed(seed)
    config = library.LoraConfig(init_lora_weights=False, **copy.deepcopy(INJECTED_CONFIG))
    return library.inject_adapter_in_model(config, factory(0))


def build_injected_pair(factory):
    """The same adapter injected by each library, with the same weights."""
    theirs = inject(peft, factory, seed=1)
    perturb_modules_to_save(theirs)
    ours = inject(lora_engine, factory, seed=1)
    copy_lora_weights(theirs, ours)
    return theirs, ours


def test_injected_model_state_dict_equals_peft_and_has_no_peft_prefix(llama_factory):
    theirs, ours = build_injected_pair(llama_factory)

    saved = lora_engine.get_peft_model_state_dict(ours)

    assert_same_tensors(saved, peft.get_peft_model_state_dict(theirs))
    assert not any(key.startswith("base_model.model.") for key in saved)


def test_injected_model_loads_peft_state_dict_with_set_peft_model_state_dict(llama_factory, input_ids):
    theirs, _ = build_injected_pair(llama_factory)
    fresh = inject(lora_engine, llama_factory, seed=4)

    result = lora_engine.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(theirs))

    assert result.unexpected_keys == []
    assert_same_logits(logits_of(fresh, input_ids), logits_of(theirs, input_ids), torch.float32)


def test_peft_injected_model_loads_our_state_dict_with_set_peft_model_state_dict(llama_factory, input_ids):
    _, ours = build_injected_pair(llama_factory)
    fresh = inject(peft, llama_factory, seed=4)

    peft.set_peft_model_state_dict(fresh, lora_engine.get_peft_model_state_dict(ours))

    assert_same_logits(logits_of(fresh, input_ids), logits_of(ours, input_ids), torch.float32)
