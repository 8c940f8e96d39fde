"""Bad adapter files get errors that name the file and what is wrong in it, before anything is allocated.

Weights files here are rewritten with peft's metadata (no config digest, ``as_peft_saved``), so each config
field is checked on its own rather than refused as "not the config these weights were saved with".
"""

import json
import re
import struct
import time

import pytest
import torch
from reliability_helpers import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_version,
    as_peft_saved,
    edit_config,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

from lora_engine import LoraConfig, PeftModel


@pytest.fixture
def folder(tmp_path):
    adapter_version(0).save_pretrained(tmp_path)
    return as_peft_saved(tmp_path)


def names(path, *details: str) -> str:
    """A regex: the message quotes ``path``, then each detail in order."""
    return ".*".join([re.escape(repr(str(path)))] + [re.escape(detail) for detail in details])


def load(folder, **kwargs):
    return PeftModel.from_pretrained(tiny_llama(), folder, **kwargs)


# ---------------------------------------------------------------------------------------------------- weights file
@pytest.mark.parametrize(
    "keep", [0, 5, 8, 50, -1], ids=["empty", "5_bytes", "length_only", "half_header", "1_short"]
)
def test_truncated_weights_file_is_named(folder, keep):
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])

    with pytest.raises(ValueError, match=names(path, "truncated")):
        load(folder)


def test_weights_file_with_a_corrupt_length_field_is_named(folder):
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])

    with pytest.raises(ValueError, match=names(path, "length field is corrupt")):
        load(folder)


def test_weights_file_with_a_bit_flipped_header_is_named(folder):
    path = folder / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[8] ^= 0x40  # the header's opening brace
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError, match=names(path, "corrupt header")):
        load(folder)


def test_weights_file_of_random_bytes_is_named(folder):
    path = folder / WEIGHTS_FILE
    path.write_bytes(
        bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    )

    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        load(folder)


def _rewrite_weights(folder, change) -> str:
    """Apply ``change`` to the weights dict and save it back; returns the first LoRA key."""
    weights = load_file(folder / WEIGHTS_FILE)
    key = sorted(key for key in weights if "lora_A" in key)[0]
    change(weights, key)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint32, torch.int8, torch.bool])
def test_integer_or_bool_lora_tensor_is_refused_naming_key_and_dtype(folder, dtype):
    key = _rewrite_weights(folder, lambda weights, key: weights.__setitem__(key, weights[key].to(dtype)))

    with pytest.raises(ValueError, match=names(folder / WEIGHTS_FILE, key, "must be floating point")):
        load(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_values_are_refused_unless_allowed(folder, bad):
    key = _rewrite_weights(folder, lambda weights, key: weights[key].view(-1).__setitem__(3, bad))

    with pytest.raises(
        ValueError, match=names(folder / WEIGHTS_FILE, key, "NaN/Inf", "allow_non_finite=True")
    ):
        load(folder)
    loaded = load(folder, allow_non_finite=True)
    assert not torch.isfinite(
        loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    ).all()


def test_base_layer_weight_in_an_adapter_file_is_refused(folder):
    base_key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    _rewrite_weights(folder, lambda weights, key: weights.__setitem__(base_key, torch.zeros(32, 32)))
    base = tiny_llama()
    before = base.model.layers[0].self_attn.q_proj.weight.clone()

    with pytest.raises(ValueError, match=names(folder / WEIGHTS_FILE, base_key, "overwrite the base")):
        load(folder)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, before)


def test_header_shape_too_large_for_the_file_is_refused_before_reading(folder):
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = sorted(key for key in header if "lora_A" in key)[0]
    header[key]["shape"] = [10**12, 32]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])

    with pytest.raises(ValueError, match=names(path, key, "needs", "bytes")):
        load(folder)


# ---------------------------------------------------------------------------------------------------- config file
def test_config_that_is_not_utf8_is_named(folder):
    (folder / CONFIG_FILE).write_bytes(b'{"r": "\xff\xfe"}')

    with pytest.raises(ValueError, match=names(folder / CONFIG_FILE, "not UTF-8")):
        load(folder)


def test_deeply_nested_config_is_named(folder):
    (folder / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(ValueError, match=names(folder / CONFIG_FILE, "nested too deeply")):
        load(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha_pattern", {"q_proj": float("nan")}),
        ("alpha_pattern", {"q_proj": float("inf")}),
        ("alpha_pattern", {"q_proj": True}),
        ("alpha_pattern", {"q_proj": 1e308}),
        ("lora_alpha", 1e39),
        ("use_rslora", "yes"),
        ("fan_in_fan_out", 1),
        ("rank_pattern", {"q_proj": 2.5}),
        ("rank_pattern", {"q_proj": True}),
        ("target_modules", 7),
        ("target_modules", [7]),
        ("exclude_modules", {"a": 1}),
        ("modules_to_save", "lm_head"),
        ("modules_to_save", [None]),
        ("layers_to_transform", [True]),
        ("layers_pattern", 3),
        ("bias", ["none"]),
        ("r", "8"),
        ("lora_dropout", float("nan")),
        ("init_lora_weights", [1]),
        ("base_model_name_or_path", 5),
        ("auto_mapping", "x"),
        ("peft_type", ["LORA"]),
        ("task_type", {"a": 1}),
    ],
)
def test_config_field_of_the_wrong_type_or_range_is_refused_naming_file_and_field(folder, field, value):
    edit_config(folder, **{field: value})

    with pytest.raises(ValueError, match=names(folder / CONFIG_FILE, field)):
        load(folder)


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        ("target_modules", "(a+)+$"),
        ("target_modules", "(.*)*q_proj"),
        ("exclude_modules", "(a|a)*b"),
        ("modules_to_save", ["(x+x+)+y"]),
        ("rank_pattern", {"(.*a){12}": 4}),
        ("alpha_pattern", {"(q|q)+_proj": 4}),
        ("layers_pattern", ["(l+)+"]),
        ("target_modules", ".*.*.*.*.*.*.*.*.*.*.*.*!"),
        ("target_modules", r"(a)\1"),
    ],
)
def test_regex_that_can_backtrack_catastrophically_is_refused_at_once(folder, field, pattern):
    changes = {field: pattern}
    if field == "layers_pattern":
        changes["layers_to_transform"] = [0]
    edit_config(folder, **changes)
    start = time.perf_counter()

    with pytest.raises(ValueError, match=names(folder / CONFIG_FILE, field, "refused because")):
        load(folder)
    assert time.perf_counter() - start < 5


def test_target_list_of_a_hundred_thousand_names_is_refused_at_once(folder):
    edit_config(folder, target_modules=[f"module_{index}" for index in range(100_000)])
    start = time.perf_counter()

    with pytest.raises(ValueError, match=names(folder / CONFIG_FILE, "target_modules has 100000 entries")):
        load(folder)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(("field", "value"), [("r", 10_000_000), ("rank_pattern", {"q_proj": 10_000_000})])
def test_absurd_rank_is_refused_before_any_allocation(folder, field, value):
    edit_config(folder, **{field: value})
    start = time.perf_counter()

    with pytest.raises(ValueError, match=names(folder / WEIGHTS_FILE, "rank", "r=10000000")):
        load(folder)
    assert time.perf_counter() - start < 5  # allocating r=10^7 factors would take seconds and gigabytes


def test_modules_to_save_given_as_a_str_is_refused_as_peft_does():
    with pytest.raises(ValueError, match=r"modules_to_save='lm_head' is a str.*\['lm_head'\]"):
        LoraConfig(target_modules=["q_proj"], modules_to_save="lm_head")
