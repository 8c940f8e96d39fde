"""The ``kernels`` fixture: the Triton kernel modules running under the interpreter on CPU tensors, with
``TRITON_INTERPRET=1`` and ``LORA_ENGINE_BACKEND=triton`` for the requesting test module only (restored after).

Triton fixes compiled-vs-interpreted when a function is *decorated*: our kernels when their module is imported,
and triton's own ``@jit`` helpers (``tl.zeros``, ``tl.sum``, ``tl.rand``, …) when ``triton.language`` is imported.
In this test process triton is imported long before any kernel test runs (``tests/conftest.py`` imports
transformers, which imports triton), so the fixture

- imports our kernel modules only once the variable is set (nothing imports them at collection time: the ops
  import them lazily, after ``backend.uses_triton`` said yes), and fails loudly if they were imported compiled;
- re-creates triton.language's ``@jit`` helpers as interpreted functions while it is active, which is what
  importing triton under ``TRITON_INTERPRET=1`` gives (a no-op when that is how triton was imported).

Why a fixture module and not ``tests/kernel_ops/conftest.py``: pytest imports every package-less ``conftest.py`` as
the top-level module ``conftest``, so a second one replaces ``tests/conftest.py`` in ``sys.modules`` and breaks the
test modules that do ``from conftest import copy_lora_weights``. Test modules here import the fixture::

    from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from lora_engine import backend

# Attribute of the fixture's namespace → module.
KERNEL_MODULES = {
    "lora_linear": "lora_engine.kernels.lora_linear",
    "grad_out_pass": "lora_engine.kernels.grad_out_pass",
    "lora_merge": "lora_engine.kernels.lora_merge",
    "grouped_lora": "lora_engine.kernels.grouped_lora",
    "nf4_dequantize": "lora_engine.kernels.nf4_dequantize",
    "nf4_merge": "lora_engine.kernels.nf4_merge",
    "nf4_lora_linear": "lora_engine.kernels.nf4_lora_linear",
    "dora_norm": "lora_engine.kernels.dora_norm",
}


def _interpret_triton_language(patch: pytest.MonkeyPatch) -> None:
    """Replace every compiled ``@jit`` helper of ``triton.language`` by an interpreted one, until ``patch`` undoes it.

    One interpreted function per helper, so that names bound to the same helper (``tl.zeros`` and
    ``triton.language.standard.zeros``) stay the same object.
    """
    interpreted: dict[int, InterpretedFunction] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name != "triton.language" and not module_name.startswith("triton.language."):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in interpreted:
                    interpreted[id(value)] = InterpretedFunction(value.fn)
                patch.setattr(module, name, interpreted[id(value)])


@pytest.fixture(scope="module", name="kernels")
def kernels_fixture():
    """A namespace with the kernel modules: ``kernels.lora_linear`` and ``kernels.lora_merge`` (the backends'
    math)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setenv(backend.ENV_VAR, "triton")
        if backend.get_backend() != "triton":
            pytest.fail(f"a set_backend({backend.get_backend()!r}) override leaked into the kernel tests")
        utils = sys.modules.get("lora_engine.kernels._utils")
        if utils is not None and not utils.INTERPRETED:
            pytest.fail(
                "lora_engine.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels are "
                "compiled for a GPU and cannot run here; import it only through the ops or this fixture"
            )
        _interpret_triton_language(patch)
        modules = {name: importlib.import_module(module) for name, module in KERNEL_MODULES.items()}
        yield types.SimpleNamespace(**modules)
