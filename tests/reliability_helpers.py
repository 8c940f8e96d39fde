"""Shared by the reliability tests, the fuzz suite and ``scripts/reliability_campaign.py``: a tiny Llama with
known adapters, their expected outputs, and the checks "loads as exactly this adapter" and "nothing changed".

Kept free of lora_engine imports that today's main lacks, so the tests that use it can be run against main.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_engine import LoraConfig, PeftModel, get_peft_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEMP_PREFIX = ".lora-engine-tmp-"
INPUT_IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 1]])


def tiny_llama(seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def adapter_version(version: int, adapter_name: str = "default", base=None) -> PeftModel:
    """Adapter ``version`` (0, 1, ...) on a fresh tiny Llama: r, alpha and weights all differ by version, so a
    folder mixing two versions gives other outputs or shapes than either."""
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=4 + 4 * (version % 2),
        lora_alpha=8 + 24 * (version % 3),
        init_lora_weights=False,
    )
    torch.manual_seed(100 + version)
    return get_peft_model(base if base is not None else tiny_llama(), config, adapter_name=adapter_name)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def load_logits(folder: Path) -> torch.Tensor:
    """Logits of a fresh tiny Llama with the adapter in ``folder`` (default layout); raises what the load raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(PeftModel.from_pretrained(tiny_llama(), folder))


def temp_files(folder: Path) -> list[str]:
    """Leftovers of an interrupted save: our temporary prefix, and the ``.tmp`` files main's writer used."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.name.startswith(TEMP_PREFIX) or path.name.endswith(".tmp")
    )


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave unchanged: module types by name, parameters' requires_grad and
    values, train/eval flags, the adapters and the active adapter, and the logits."""
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "requires_grad": [(name, param.requires_grad) for name, param in model.named_parameters()],
        "values": {name: param.detach().clone() for name, param in model.named_parameters()},
        "training": [module.training for module in model.modules()],
        "adapters": sorted(getattr(model, "peft_config", {}) or {}),
        "active": getattr(model, "active_adapters", None),
        "has_peft_config": "peft_config" in model.__dict__,
        "logits": logits(model),
    }


def assert_same_fingerprint(before: dict, after: dict) -> None:
    for key in ("modules", "requires_grad", "training", "adapters", "active", "has_peft_config"):
        assert before[key] == after[key], key
    assert before["values"].keys() == after["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(value, after["values"][name]), name
    assert torch.equal(before["logits"], after["logits"])


# ---------------------------------------------------------------------------------------------------- kill loop
def _save_forever(
    folder: str, adapter_name: str, models: list, start: int, ready, slow_renames: bool
) -> None:
    """Child of ``kill_during_saves``: save the versions in turn, forever, until killed. ``slow_renames``
    makes every rename take 10 ms more (a slow disk), so that kills often land between two renames."""
    if slow_renames:
        real_replace = os.replace

        def slow_replace(source, destination):
            real_replace(source, destination)
            time.sleep(0.01)

        os.replace = slow_replace
    ready.set()
    for index in range(start, 10**9):
        models[index % len(models)].save_pretrained(folder, selected_adapters=[adapter_name])


def kill_during_saves(
    root: Path, adapter_name: str, kills: int, seed: int = 0, slow_renames: bool = False
) -> dict[str, int]:
    """Run ``save_pretrained`` of alternating adapter versions in a forked child process and SIGKILL it at a
    random moment, ``kills`` times; after each kill, check that the folder loads as exactly one complete
    version, then that the next save (of that version) leaves no temporary file. Returns counts; raises AssertionError on the
    first torn folder or leftover."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    torch.set_num_threads(1)  # a forked child must not wait on the parent's thread pool
    models = [adapter_version(0, adapter_name), adapter_version(1, adapter_name)]
    folder = root / adapter_name if adapter_name != "default" else root
    models[0].save_pretrained(root, selected_adapters=[adapter_name])
    expected = []
    for model in models:
        model.save_pretrained(root / "expected", selected_adapters=[adapter_name])
        expected.append(_named_load(root / "expected", adapter_name))
    rng = random.Random(seed)
    on_disk = 0  # the version the folder holds; the child starts by saving the other one
    counts = {"kills": 0, "loaded_old_or_new": 0, "had_leftovers": 0, "clean_after_next_save": 0}
    for _ in range(kills):
        ready = context.Event()
        child = context.Process(
            target=_save_forever, args=(str(root), adapter_name, models, on_disk + 1, ready, slow_renames)
        )
        child.start()
        ready.wait(30)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        counts["kills"] += 1
        counts["had_leftovers"] += bool(temp_files(folder))
        counts["torn_pair_recovered"] = counts.get("torn_pair_recovered", 0) + _is_torn(folder)
        loaded = _named_load(root, adapter_name)
        # The versions' logits differ by far more than the tolerance; a torn pair matches neither.
        matches = [torch.allclose(loaded, version, atol=1e-6, rtol=0) for version in expected]
        assert any(matches), "torn folder: it loads as neither version"
        on_disk = matches.index(True)
        models[on_disk].save_pretrained(root, selected_adapters=[adapter_name])  # the next save tidies up
        assert temp_files(folder) == [], temp_files(folder)
        counts["clean_after_next_save"] += 1
        counts["loaded_old_or_new"] += 1
    return counts


def _is_torn(folder: Path) -> bool:
    """Whether the weights' config digest differs from adapter_config.json's (killed between the renames)."""
    from safetensors import safe_open

    try:
        from lora_engine.file_checks import CONFIG_DIGEST_KEY, bound_config_digest
    except ImportError:  # a lora_engine without config digests (before issue 17): nothing to compare
        return False

    with safe_open(folder / WEIGHTS_FILE, "pt") as weights:
        digest = (weights.metadata() or {}).get(CONFIG_DIGEST_KEY)
    return digest is not None and digest != bound_config_digest(config_dict(folder))


def _named_load(root: Path, adapter_name: str) -> torch.Tensor:
    folder = root if adapter_name == "default" else root / adapter_name
    return load_logits(folder)


def as_peft_saved(folder: Path) -> Path:
    """Rewrite ``folder``'s weights with peft's metadata (``{"format": "pt"}``, no config digest), so that a
    config edited afterwards is checked field by field, as a peft-saved file is. Returns ``folder``."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / WEIGHTS_FILE)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = config_dict(folder)
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def config_dict(folder: Path) -> dict:
    return json.loads((folder / CONFIG_FILE).read_text())
