"""``lora-engine inspect`` and ``merge`` on a tiny Llama folder, with adapters saved by lora_engine and by peft;
bad input exits with status 2 and one line on stderr."""

import subprocess
import sys
import types

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_demo import tiny_chat_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_engine
from lora_engine.cli.main import main
from lora_engine.demo.model import load_base

LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": "all-linear",
    "rank_pattern": {"q_proj": 8},
    "init_lora_weights": False,  # random B too, so that merging changes the weights
    "task_type": "CAUSAL_LM",
}
INPUT_IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 2]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama (64 wide, as bitsandbytes' CPU 4-bit needs) saved with a tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(hidden_size=64).save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return folder


def _fresh_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _saved(model, tmp_path_factory, name: str):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def our_adapter(base_dir, tmp_path_factory):
    torch.manual_seed(1)
    model = lora_engine.get_peft_model(_fresh_base(base_dir), lora_engine.LoraConfig(**LORA))
    return _saved(model, tmp_path_factory, "ours")


@pytest.fixture(scope="module")
def peft_adapter(base_dir, tmp_path_factory):
    torch.manual_seed(2)
    return _saved(
        peft.get_peft_model(_fresh_base(base_dir), peft.LoraConfig(**LORA)), tmp_path_factory, "peft"
    )


def _run(argv, capsys):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("adapter", ["our_adapter", "peft_adapter"])
def test_inspect_reports_targets_ranks_parameters_dtypes_and_size(adapter, request, capsys):
    folder = request.getfixturevalue(adapter)
    status, out, _ = _run(["inspect", folder], capsys)

    assert status == 0
    tensors = load_file(folder / "adapter_model.safetensors")
    assert (
        f"parameters: {sum(tensor.numel() for tensor in tensors.values()):,} in {len(tensors)} tensors" in out
    )
    assert "targeted modules: 14" in out  # 7 linear layers in each of the 2 decoder layers
    assert "model.layers.*.self_attn.q_proj  x2  r=8" in out  # from rank_pattern
    assert "model.layers.*.mlp.down_proj  x2  r=4" in out
    assert 'rank_pattern: {"q_proj": 8}' in out
    assert "dtypes: F32 (28 tensors)" in out
    assert "task_type: CAUSAL_LM" in out
    assert "adapter_model.safetensors" in out and "KiB" in out


def test_inspect_reads_a_bin_adapter_without_loading_a_model(base_dir, tmp_path, capsys):
    model = peft.get_peft_model(_fresh_base(base_dir), peft.LoraConfig(**LORA))
    model.save_pretrained(tmp_path, safe_serialization=False)
    status, out, _ = _run(["inspect", tmp_path], capsys)
    assert status == 0
    assert "targeted modules: 14" in out and "float32 (28 tensors)" in out and "adapter_model.bin" in out


def test_inspect_counts_dora_magnitudes_apart_from_the_factors(base_dir, tmp_path, capsys):
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True)
    peft.get_peft_model(_fresh_base(base_dir), config).save_pretrained(tmp_path)
    status, out, _ = _run(["inspect", tmp_path], capsys)
    assert status == 0
    assert "use_dora: true" in out
    magnitudes = {
        key: tensor
        for key, tensor in load_file(tmp_path / "adapter_model.safetensors").items()
        if key.endswith("lora_magnitude_vector")
    }
    count = sum(tensor.numel() for tensor in magnitudes.values())
    assert f"DoRA magnitude vectors: {count:,} in {len(magnitudes)}" in out
    assert "other tensors" not in out
    assert "warning" not in out  # lora_engine loads DoRA adapters


def test_inspect_warns_about_an_option_lora_engine_cannot_load(base_dir, tmp_path, capsys):
    config = peft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]])
    peft.get_peft_model(_fresh_base(base_dir), config).save_pretrained(tmp_path)
    status, out, _ = _run(["inspect", tmp_path], capsys)
    assert status == 0
    assert "warning: layer_replication=[[0, 2]] is not supported yet by lora_engine" in out


# ---------------------------------------------------------------------------------------------------- merge


def _logits(model):
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.mark.parametrize(
    ("adapter", "peft_model_class"),
    [("our_adapter", lora_engine.PeftModel), ("peft_adapter", peft.PeftModel)],
)
def test_merged_folder_loads_as_a_plain_model_with_the_adapted_logits(
    adapter, peft_model_class, base_dir, tmp_path, request, capsys
):
    folder = request.getfixturevalue(adapter)
    status, out, err = _run(
        ["merge", "--base", base_dir, "--adapter", folder, "--out", tmp_path / "merged"], capsys
    )
    assert status == 0, err

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = peft_model_class.from_pretrained(_fresh_base(base_dir), folder).eval()
    torch.testing.assert_close(_logits(merged), _logits(adapted), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(_fresh_base(base_dir)))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert "float32 model" in out


def test_merge_copies_the_base_folders_tokenizer(base_dir, our_adapter, tmp_path, capsys):
    _run(["merge", "--base", base_dir, "--adapter", our_adapter, "--out", tmp_path / "merged"], capsys)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template == tiny_chat_tokenizer().chat_template


def _four_bit_adapted(base_dir, adapter_dir):
    # load_base keeps bitsandbytes off its CPU repacking path, which rounds the absmax to bf16 (~1e-3 off).
    base = load_base(base_dir, "cpu", four_bit=True)
    return lora_engine.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("four_bit_base", ["--load-in-4bit", "saved 4-bit folder"])
def test_merge_from_a_4bit_base_dequantizes_and_matches_the_qlora_model(
    four_bit_base, base_dir, our_adapter, tmp_path, capsys
):
    argv = ["merge", "--adapter", our_adapter, "--out", tmp_path / "merged"]
    if four_bit_base == "--load-in-4bit":
        argv += ["--base", base_dir, "--load-in-4bit"]
    else:  # the folder's config has a bnb quantization_config: no flag needed
        load_base(base_dir, "cpu", four_bit=True).save_pretrained(tmp_path / "base-4bit")
        argv += ["--base", tmp_path / "base-4bit"]
    status, _, err = _run(argv, capsys)
    assert status == 0, err

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(
        _logits(merged), _logits(_four_bit_adapted(base_dir, our_adapter)), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def narrow_adapter(tmp_path_factory):
    """An adapter for a 32-wide Llama: it does not fit the 64-wide base."""
    model = lora_engine.get_peft_model(tiny_llama(hidden_size=32), lora_engine.LoraConfig(**LORA))
    return _saved(model, tmp_path_factory, "narrow")


@pytest.fixture(scope="module")
def gpt2_style_adapter(tmp_path_factory):
    """An adapter whose target modules do not exist in a Llama."""
    model = lora_engine.get_peft_model(
        tiny_llama(hidden_size=64), lora_engine.LoraConfig(target_modules=["q_proj"])
    )
    folder = _saved(model, tmp_path_factory, "gpt2_style")
    config = (folder / "adapter_config.json").read_text().replace('"q_proj"', '"c_attn"')
    (folder / "adapter_config.json").write_text(config)
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing base", "does not exist"),
        ("base without config", "no config.json"),
        ("missing adapter", "is not a folder"),
        ("folder without adapter config", "no adapter_config.json"),
        ("out not empty", "not an empty folder"),
        ("adapter for another width", "does not fit"),
        ("adapter for other modules", "does not fit"),
    ],
)
def test_merge_bad_input_exits_2_with_one_line(
    case, expected, base_dir, our_adapter, narrow_adapter, gpt2_style_adapter, tmp_path, capsys
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    base, adapter, out = base_dir, our_adapter, tmp_path / "out"
    if case == "missing base":
        base = tmp_path / "nowhere"
    elif case == "base without config":
        base = tmp_path / "empty"
    elif case == "missing adapter":
        adapter = tmp_path / "nowhere"
    elif case == "folder without adapter config":
        adapter = base_dir
    elif case == "out not empty":
        out = tmp_path / "full"
    elif case == "adapter for another width":
        adapter = narrow_adapter
    elif case == "adapter for other modules":
        adapter = gpt2_style_adapter

    status, out_text, err = _run(["merge", "--base", base, "--adapter", adapter, "--out", out], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("lora-engine merge: error: ") and expected in err
    assert "Traceback" not in err and out_text == ""
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing folder", "no adapter config", "corrupt safetensors", "no weights"])
def test_inspect_bad_input_exits_2_with_one_line(case, our_adapter, tmp_path, capsys):
    folder = tmp_path / "adapter"
    if case != "missing folder":
        folder.mkdir()
    if case in ("corrupt safetensors", "no weights"):
        (folder / "adapter_config.json").write_text((our_adapter / "adapter_config.json").read_text())
    if case == "corrupt safetensors":
        (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)

    status, _, err = _run(["inspect", folder], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("lora-engine inspect: error: ")


# ---------------------------------------------------------------------------------------------------- dispatch


def test_bench_is_handed_its_own_arguments(monkeypatch):
    received = []
    fake_bench = types.ModuleType("lora_engine.bench")
    fake_bench.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lora_engine.bench", fake_bench)
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    assert received == [["--quick", "--device", "cpu"]]


def test_bench_without_an_entry_point_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lora_engine.bench", types.ModuleType("lora_engine.bench"))
    assert main(["bench"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# Runs `lora-engine ARGV...` (its output discarded) in a fresh interpreter and prints the names of the modules
# imported by `import lora_engine` alone, then of those imported after the command, each list after a marker line.
MODULES_AFTER_COMMAND = """
import contextlib, io, sys
import lora_engine
print("--- package", *sys.modules, sep="\\n")
from lora_engine.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print("--- command", *sys.modules, sep="\\n")
"""
SUBCOMMAND_MODULES = {
    "lora_engine.demo.command",
    "lora_engine.demo.model",
    "lora_engine.demo.data",
    "lora_engine.demo.train",
    "lora_engine.cli.inspect",
    "lora_engine.cli.merge",
    "lora_engine.bench",
}


def _modules_imported(*argv, cwd) -> tuple[set[str], set[str]]:
    """``(modules after import lora_engine, modules after lora-engine ARGV)`` in a fresh interpreter."""
    # Run outside the repository: from its root, the repo's kernels/ folder would shadow HF's `kernels` package.
    result = subprocess.run(
        [sys.executable, "-c", MODULES_AFTER_COMMAND, *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    package_part, command_part = result.stdout.split("--- package\n", 1)[1].split("--- command\n", 1)
    return set(package_part.splitlines()), set(command_part.splitlines())


def test_top_level_help_imports_only_the_package_and_the_dispatcher(tmp_path):
    package, after_help = _modules_imported("--help", cwd=tmp_path)

    assert not after_help & SUBCOMMAND_MODULES
    added = after_help - package
    dispatcher = {"lora_engine.cli", "lora_engine.cli.main", "lora_engine.cli.errors"}
    assert {name for name in added if name.split(".")[0] not in sys.stdlib_module_names} == dispatcher


def test_subcommand_help_imports_that_subcommand_alone(tmp_path):
    _, after_help = _modules_imported("inspect", "--help", cwd=tmp_path)
    assert after_help & SUBCOMMAND_MODULES == {"lora_engine.cli.inspect"}


# What `import lora_engine` and the commands below must not load: inspect reads JSON and safetensors headers only.
HEAVY_PACKAGES = {
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "triton",
    "numpy",
    "safetensors",
    "peft",
}


@pytest.mark.parametrize(
    "argv", [["--help"], ["merge", "--help"], ["inspect", "ADAPTER"]], ids=["help", "merge-help", "inspect"]
)
def test_help_merge_help_and_inspect_load_no_heavy_package(argv, our_adapter, tmp_path):
    argv = [str(our_adapter) if arg == "ADAPTER" else arg for arg in argv]
    package, after_command = _modules_imported(*argv, cwd=tmp_path)

    assert not {name.split(".")[0] for name in package} & HEAVY_PACKAGES
    assert not {name.split(".")[0] for name in after_command} & HEAVY_PACKAGES


def test_inspect_reads_a_safetensors_adapter_without_importing_torch(our_adapter, tmp_path):
    # torch is blocked before the package is loaded: any `import torch` on the inspect path would raise ImportError
    # and the command would fail.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import lora_engine\n"
        "from lora_engine.cli.main import main\n"
        "assert main(['inspect', sys.argv[1]]) == 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(our_adapter)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "targeted modules: 14" in result.stdout


def test_python_dash_m_lora_engine_lists_the_subcommands(tmp_path):
    # Run outside the repository: from its root, the repo's kernels/ folder would shadow HF's `kernels` package.
    result = subprocess.run(
        [sys.executable, "-m", "lora_engine", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(name in result.stdout for name in ("demo", "inspect", "merge", "bench"))
