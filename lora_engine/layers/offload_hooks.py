"""accelerate's offloading hooks on the modules inside a LoRA wrapper.

``accelerate.cpu_offload`` and ``dispatch_model`` with offloaded layers put a hook (``module._hf_hook``) on each
module that holds parameters, replacing its ``forward``: the weights live on the ``meta`` device and are loaded
only around that module's own forward. A LoRA wrapper reads its base weight and factors directly (one op for the
base and the low-rank term), never calling those modules, so it runs their hooks itself around its whole forward:
``pre_forward`` before (loads the weights), ``post_forward`` after (offloads them again). Hooks that only move
inputs and outputs do nothing here: the wrapper is called with no arguments of theirs to move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def has_offload_hooks(base_layer: nn.Module) -> bool:
    """Whether accelerate hooked the wrapped layer (it hooks every module holding parameters, so the factors'
    modules too): one dictionary lookup, for every forward."""
    return "_hf_hook" in base_layer.__dict__


@contextlib.contextmanager
def weights_loaded(wrapper: nn.Module) -> Iterator[None]:
    """Runs ``pre_forward`` of every hooked module inside ``wrapper`` on entry and their ``post_forward`` on exit
    (also on an exception), in reverse order. Mutates those modules' parameters as the hooks do."""
    hooked = [
        module for module in wrapper.modules() if "_hf_hook" in module.__dict__ and module is not wrapper
    ]
    entered = []
    try:
        for module in hooked:
            module._hf_hook.pre_forward(module)
            entered.append(module)
        yield
    finally:
        for module in reversed(entered):
            module._hf_hook.post_forward(module, None)
