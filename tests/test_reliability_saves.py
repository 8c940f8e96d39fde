"""A save is all-or-nothing: after a crash at any moment, or an error, the folder loads as the complete old adapter
or the complete new one, never a mix; leftovers are ignored by loads and removed by the next save; peft still
loads the files.

The kill loop forks a real child process that saves in a loop and SIGKILLs it at random moments (nothing is
mocked in the saver). ``scripts/reliability_campaign.py`` runs the same loop with >= 200 kills.
"""

import errno
import json
import os
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from reliability_helpers import (
    CONFIG_FILE,
    TEMP_PREFIX,
    WEIGHTS_FILE,
    adapter_version,
    files_under,
    kill_during_saves,
    load_logits,
    logits,
    temp_files,
    tiny_llama,
)

from lora_engine import PeftModel


@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("slow_renames", [False, True], ids=["disk", "slow_renames"])
def test_sigkill_at_random_moments_of_a_save_leaves_the_old_or_the_new_adapter(
    adapter_name, slow_renames, tmp_path
):
    counts = kill_during_saves(
        tmp_path, adapter_name, kills=8, seed=len(adapter_name), slow_renames=slow_renames
    )

    assert counts["loaded_old_or_new"] == counts["clean_after_next_save"] == counts["kills"] == 8


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EPERM], ids=["ENOSPC", "EIO", "EPERM"])
def test_error_at_the_config_rename_leaves_the_old_adapter_and_no_temporary_file(code, tmp_path, monkeypatch):
    adapter_version(0).save_pretrained(tmp_path)
    before = files_under(tmp_path)
    real_replace = os.replace

    def fail_for_the_config(source, destination):
        if Path(destination).name == CONFIG_FILE:
            raise OSError(code, os.strerror(code), str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", fail_for_the_config)
    with pytest.raises(OSError) as raised:
        adapter_version(1).save_pretrained(tmp_path)

    assert raised.value.errno == code
    assert files_under(tmp_path) == before


def test_error_at_the_weights_rename_leaves_the_old_adapter_and_no_temporary_file(tmp_path, monkeypatch):
    adapter_version(0).save_pretrained(tmp_path)
    before = files_under(tmp_path)
    real_replace = os.replace

    def fail_for_the_weights(source, destination):
        if Path(destination).name == WEIGHTS_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", fail_for_the_weights)
    with pytest.raises(OSError, match="No space left"):
        adapter_version(1).save_pretrained(tmp_path)

    assert files_under(tmp_path) == before


def _tear(folder: Path, tmp_path: Path) -> None:
    """Put version 1's weights beside version 0's config, as a kill between the two renames would."""
    adapter_version(0).save_pretrained(folder)
    adapter_version(1).save_pretrained(tmp_path / "v1")
    (folder / WEIGHTS_FILE).write_bytes((tmp_path / "v1" / WEIGHTS_FILE).read_bytes())


def test_weights_beside_a_config_they_were_not_saved_with_are_refused_naming_both_files(tmp_path):
    folder = tmp_path / "torn"
    _tear(folder, tmp_path)

    names_both = f"{re.escape(str(folder / CONFIG_FILE))}.*{re.escape(str(folder / WEIGHTS_FILE))}"
    with pytest.raises(ValueError, match=names_both):
        load_logits(folder)


def test_a_torn_pair_with_the_new_config_left_by_the_save_loads_as_the_new_adapter(tmp_path):
    folder = tmp_path / "torn"
    _tear(folder, tmp_path)
    (folder / f"{TEMP_PREFIX}{CONFIG_FILE}.x.tmp").write_bytes((tmp_path / "v1" / CONFIG_FILE).read_bytes())

    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = logits(PeftModel.from_pretrained(tiny_llama(), folder))

    assert torch.allclose(loaded, load_logits(tmp_path / "v1"), atol=1e-6, rtol=0)


def test_leftover_temporary_files_are_ignored_by_load_and_removed_by_the_next_save(tmp_path):
    adapter_version(0).save_pretrained(tmp_path)
    expected = load_logits(tmp_path)
    (tmp_path / f"{TEMP_PREFIX}{WEIGHTS_FILE}.1.tmp").write_bytes(b"half a file")
    (tmp_path / f"{TEMP_PREFIX}{CONFIG_FILE}.1.tmp").write_text("{")

    assert torch.equal(load_logits(tmp_path), expected)
    adapter_version(0).save_pretrained(tmp_path)
    assert temp_files(tmp_path) == []


def test_editing_fields_that_do_not_change_the_weights_meaning_keeps_the_pair_loadable(tmp_path):
    adapter_version(0).save_pretrained(tmp_path)
    expected = load_logits(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config.update(base_model_name_or_path="moved/elsewhere", revision="v2", inference_mode=False)
    config["target_modules"] = list(reversed(config["target_modules"]))  # a set: its order means nothing
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))

    assert torch.equal(load_logits(tmp_path), expected)


def test_peft_loads_our_files_with_the_config_digest_in_their_metadata(tmp_path):
    ours = adapter_version(1)
    ours.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)

    assert torch.allclose(logits(theirs), logits(ours), atol=1e-6, rtol=0)
