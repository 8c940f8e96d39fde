"""A pytest plugin: ``tests/kernel_ops`` on CUDA tensors with compiled kernels, never the interpreter.

    pytest -p kernel_tests_on_cuda tests/kernel_ops      (with benchmarks/ on PYTHONPATH; gpu_session.sh does it)

The kernel tests are written for the CPU: their ``kernels`` fixture (``tests/kernel_ops/triton_interpreter.py``)
sets ``TRITON_INTERPRET=1``, and they build CPU tensors, mostly from CPU ``torch.Generator``s. This plugin
replaces that fixture, before any test module imports it, by one that

- imports the kernel modules compiled (``TRITON_INTERPRET`` must be unset) with ``LORA_ENGINE_BACKEND=triton``;
- makes every tensor factory that names no device (``torch.randn``, ``torch.empty``, ``nn.Linear``'s weights,
  ...) return a CUDA tensor, as ``with torch.device("cuda")`` does. A factory given a CPU generator draws on the
  CPU and copies, so the tests' seeded values are the same numbers as on the CPU.

A test that names the CPU device explicitly still gets CPU tensors; with the triton backend such a test fails
(no interpreter), which is reported, not hidden: it is a test of CPU-only behaviour.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

KERNEL_TESTS = Path(__file__).resolve().parents[1] / "tests" / "kernel_ops"


class FactoriesOnCuda(TorchFunctionMode):
    """Tensor factories without a ``device`` make CUDA tensors; with a CPU generator, drawn on the CPU first."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _device_constructors() or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == "cpu":
            return func(*args, **kwargs).to("cuda")
        return func(*args, **{**kwargs, "device": "cuda"})


@pytest.fixture(scope="module", name="kernels")
def kernels_on_cuda():
    """The ``kernels`` namespace of ``triton_interpreter.kernels_fixture``, compiled, with CUDA factories."""
    import triton_interpreter

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setenv("LORA_ENGINE_BACKEND", "triton")
        modules = {
            name: importlib.import_module(module)
            for name, module in triton_interpreter.KERNEL_MODULES.items()
        }
        with FactoriesOnCuda():
            yield types.SimpleNamespace(**modules)


def pytest_configure(config):
    """Swap the fixture in before collection imports the test modules (they import it by name)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("kernel_tests_on_cuda: unset TRITON_INTERPRET (this runs compiled kernels)")
    if not torch.cuda.is_available():
        raise pytest.UsageError("kernel_tests_on_cuda: torch sees no CUDA device")
    sys.path.insert(0, str(KERNEL_TESTS))
    import triton_interpreter

    triton_interpreter.kernels_fixture = kernels_on_cuda
