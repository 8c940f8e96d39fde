"""``import lora_engine`` defers transformers and bitsandbytes until a name that needs them is used, and every
public name still resolves."""

import subprocess
import sys
import textwrap

import pytest

import lora_engine


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout.strip()


def test_every_name_in_all_resolves_and_is_listed_by_dir():
    for name in lora_engine.__all__:
        assert getattr(lora_engine, name) is not None, name
    assert set(lora_engine.__all__) <= set(dir(lora_engine))


def test_importing_lora_engine_imports_neither_transformers_nor_bitsandbytes():
    loaded = _run(
        """
        import sys
        import lora_engine
        from lora_engine import LoraConfig
        LoraConfig(r=4, target_modules=["q_proj"])
        print(sorted(name for name in ("transformers", "bitsandbytes") if name in sys.modules))
        """
    )
    assert loaded == "[]"


def test_a_deferred_name_imports_its_module_on_first_use():
    loaded = _run(
        """
        import sys
        from lora_engine import PeftModel, get_peft_model
        print(PeftModel.__module__, get_peft_model.__module__, "transformers" in sys.modules)
        """
    )
    assert loaded == "lora_engine.peft_model lora_engine.mapping True"


def test_an_unknown_attribute_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        lora_engine.NoSuchThing  # noqa: B018
