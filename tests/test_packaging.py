"""The distribution: one top-level package, and no top-level `kernels` for transformers or bitsandbytes to find."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("lora_engine-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_holds_exactly_one_top_level_package_lora_engine(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lora_engine"}
    assert "lora_engine/kernels/__init__.py" in wheel_names


def test_wheel_holds_every_module_of_the_source_tree(wheel_names):
    sources = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "lora_engine").rglob("*.py")}
    kernels = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "kernels").rglob("*.py")}
    assert sources | {f"lora_engine/{name}" for name in kernels} <= wheel_names


def test_importing_models_and_bitsandbytes_leaves_no_top_level_kernels(tmp_path):
    probe = (
        "import importlib.util, sys\n"
        "import lora_engine, bitsandbytes\n"
        "from transformers import LlamaForCausalLM\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "assert 'kernels' not in sys.modules\n"
        "import lora_engine.kernels\n"
    )
    # Run from a folder outside the repo, as a user's script would.
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path)
