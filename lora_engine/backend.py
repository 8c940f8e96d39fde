"""Which implementation an op runs: the pure-PyTorch reference or a Triton kernel.

The setting comes from ``set_backend()`` if it was called, else from the environment variable
``LORA_ENGINE_BACKEND`` (read each time an op runs), else ``"auto"``:

- ``"auto"``: the Triton kernel for CUDA tensors when triton imports and the op has one; the reference otherwise.
- ``"triton"``: the Triton kernel always. Where it cannot run, an error says why; never a silent fallback.
- ``"reference"``: pure PyTorch.

Each op asks once per call: an op with a kernel calls ``uses_triton`` and runs what it answers; an op without one
calls ``require_reference``, which refuses ``"triton"``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "LORA_ENGINE_BACKEND"

_override: str | None = None


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The current setting: ``"auto"``, ``"triton"`` or ``"reference"``."""
    if _override is not None:
        return _override
    setting = os.environ.get(ENV_VAR)
    if setting is None:  # the usual case, asked on every op call: no string work
        return "auto"
    return _checked(setting.strip().lower(), ENV_VAR)


def set_backend(name: str | None) -> None:
    """Override ``LORA_ENGINE_BACKEND`` for this process; ``None`` goes back to the environment variable."""
    global _override
    _override = None if name is None else _checked(name, "set_backend")


# Asked on every op call, and the answer cannot change while the process runs: looked up once (finding the
# package does not import it). A constant, not a cached function, so that torch.compile does not trace it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_triton(op_name: str, device: torch.device) -> bool:
    """Whether ``op_name``, an op that has a Triton kernel, runs it (True) or the reference (False) on tensors of
    ``device``.

    Raises ``RuntimeError`` when the backend is ``"triton"`` and the kernel cannot run: triton not installed, or
    CPU tensors without ``TRITON_INTERPRET=1``.
    """
    backend = get_backend()
    if backend == "reference":
        return False
    triton_installed = _TRITON_INSTALLED
    if backend == "auto":
        return triton_installed and device.type == "cuda"
    if not triton_installed:
        raise RuntimeError(f"{ENV_VAR}=triton, but triton is not installed (pip install triton)")
    if device.type != "cuda" and not _triton_interpreted():
        raise RuntimeError(
            f"{ENV_VAR}=triton, but op '{op_name}' got {device.type} tensors: Triton runs on CUDA, "
            "or on the CPU only under TRITON_INTERPRET=1"
        )
    return True


def require_reference(op_name: str) -> None:
    """For ``op_name``, an op with no Triton kernel yet, which therefore always runs the reference: returns under
    ``"auto"`` and ``"reference"``; raises ``RuntimeError`` naming the op under ``"triton"``, which asks for a
    kernel that does not exist."""
    if get_backend() == "triton":
        raise RuntimeError(
            f"{ENV_VAR}=triton, but op '{op_name}' has no Triton kernel yet; "
            f"set {ENV_VAR}=auto or {ENV_VAR}=reference to use the PyTorch reference"
        )
