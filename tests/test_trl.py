"""TRL's SFTTrainer and DPOTrainer train a lora_engine model exactly as they train a peft model.

Each test runs the same script (trl_setup.py) with peft (the oracle) and with lora_engine, and compares.
"""

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from trl_setup import base, losses, train

import lora_engine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(library, kind, wrap_first)``: the trainer after training, each script run once per module."""
    runs = {}

    def run(library, kind: str, wrap_first: bool):
        key = (library.__name__, kind, wrap_first)
        if key not in runs:
            runs[key] = train(library, kind, wrap_first, tmp_path_factory.mktemp("_".join(map(str, key))))
        return runs[key]

    return run


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("wrap_first", [True, False], ids=["wrapped_model", "peft_config"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainer_steps_match_peft(trained, kind, wrap_first):
    expected, actual = trained(peft, kind, wrap_first), trained(lora_engine, kind, wrap_first)

    assert isinstance(actual.model, lora_engine.PeftModel)
    assert len(losses(expected)) == 3
    assert losses(actual) == pytest.approx(losses(expected), rel=1e-5)
    ours, theirs = _adapter(actual.model), _adapter(expected.model)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("wrap_first", [True, False], ids=["wrapped_model", "peft_config"])
def test_dpo_reference_is_the_policy_without_its_adapter_not_a_second_base(trained, wrap_first):
    expected, actual = trained(peft, "dpo", wrap_first), trained(lora_engine, "dpo", wrap_first)

    assert actual.ref_model is None and expected.ref_model is None
    base_parameters = sum(param.numel() for param in base().parameters())
    in_memory = sum(param.numel() for param in actual.model.parameters())
    assert in_memory == sum(param.numel() for param in expected.model.parameters())
    adapters = sum(param.numel() for param in _adapter(actual.model).values())
    assert in_memory == base_parameters + adapters  # one base, not a second copy for the reference
    # An already-wrapped model keeps a frozen copy of its starting adapter as the reference, as TRL does for peft.
    assert ("ref" in actual.model.peft_config) == wrap_first


_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # as if peft were not installed: import peft fails, find_spec("peft") is None
import lora_engine
from trl_setup import losses, train
runs = [losses(train(lora_engine, kind, wrap_first, f"{sys.argv[1]}/{kind}")) for kind, wrap_first in json.loads(sys.argv[2])]
assert "peft" not in sys.modules or sys.modules["peft"] is None
print(json.dumps(runs))
"""


def test_trl_trains_lora_engine_models_when_peft_is_not_installed(trained, tmp_path):
    scripts = [("sft", False), ("dpo", True)]  # SFT from peft_config=, DPO on a wrapped model
    output = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PEFT, str(tmp_path), json.dumps(scripts)],
        cwd=Path(__file__).parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for (kind, wrap_first), run in zip(scripts, json.loads(output.splitlines()[-1]), strict=True):
        assert run == pytest.approx(losses(trained(peft, kind, wrap_first)), rel=1e-5)
