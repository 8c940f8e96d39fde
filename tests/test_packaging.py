"""The distribution: one top-level package, and no top-level `kernels` for transformers or bitsandbytes to find."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_exactly_one_top_level_package_lora_engine(tmp_path):
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
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lora_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lora_engine"}
    assert "lora_engine/kernels/__init__.py" in names
    assert "lora_engine/reference/lora_linear.py" in names


def test_wheel_holds_every_module_of_the_source_tree(tmp_path):
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
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lora_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "lora_engine").rglob("*.py")}
    sources |= {
        "lora_engine/" + path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "kernels").rglob("*.py")
    }
    assert sources - names == set()


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
