"""Fuzz suite (hypothesis, small): mutated configs, mutated safetensors headers and bytes, truncated files.

Each case must be refused with an error naming the file while the host model stays exactly as it was, or load
exactly what the files say (``adapter_fuzzing.judge_load``); each has a deadline, so a hang fails the test.
``scripts/reliability_campaign.py`` runs the same judge on thousands of cases.
"""

import random
import shutil

import pytest
from adapter_fuzzing import judge_load, mutate_config_text, mutate_weights_bytes, write_values_mutation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import CONFIG_FILE, WEIGHTS_FILE, adapter_version, as_peft_saved

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A peft-style adapter folder (no config digest, so every config field is judged on its own)."""
    folder = tmp_path_factory.mktemp("pristine")
    adapter_version(1).save_pretrained(folder)
    return as_peft_saved(folder)


@pytest.fixture(scope="module")
def host():
    return adapter_version(0, adapter_name="keep")


def fresh_copy(pristine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    shutil.copytree(pristine, folder, dirs_exist_ok=True)
    return folder


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_config_is_refused_naming_the_file_or_loads_what_it_says(
    seed, pristine, host, tmp_path_factory
):
    folder = fresh_copy(pristine, tmp_path_factory)
    text = (folder / CONFIG_FILE).read_text()
    (folder / CONFIG_FILE).write_bytes(mutate_config_text(text, random.Random(seed)))

    assert judge_load(host, folder) in ("refused", "loaded")


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_weights_file_is_refused_naming_the_file_or_loads_what_it_says(
    seed, pristine, host, tmp_path_factory
):
    folder = fresh_copy(pristine, tmp_path_factory)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(mutate_weights_bytes(data, random.Random(seed)))

    assert judge_load(host, folder) in ("refused", "loaded")


@settings(max_examples=15, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, 10_000), which=st.sampled_from([CONFIG_FILE, WEIGHTS_FILE]))
def test_truncated_file_is_refused_naming_it(keep, which, pristine, host, tmp_path_factory):
    folder = fresh_copy(pristine, tmp_path_factory)
    data = (folder / which).read_bytes()
    (folder / which).write_bytes(data[: keep % len(data)])

    assert judge_load(host, folder) == "refused"


@settings(max_examples=10, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_non_finite_or_integer_weights_are_refused_naming_the_file(seed, pristine, host, tmp_path_factory):
    folder = fresh_copy(pristine, tmp_path_factory)
    write_values_mutation(folder, random.Random(seed))

    assert judge_load(host, folder) == "refused"
