"""Reading a model's tensors under their state-dict keys without running state-dict hooks.

Every read of adapter (or trainable) tensors from a live model goes through ``state_tensors``: saving adapter
files, loading them back (which needs the keys and shapes to match against), and the wrappers' saved-key maps.

Why not ``model.state_dict()``: it runs each module's ``_save_to_state_dict``, and bitsandbytes' ``Linear4bit``
mutates its weight there. On a CPU with AVX512-BF16, bnb repacks a 4-bit weight into a CPU-only layout at its
first no-grad eval forward; ``_save_to_state_dict`` converts it back *in place*, quantizing the bf16 absmax
again. Measured on the tiny Llama of ``tests/test_qlora.py`` (NF4, double quantization, after one eval forward):
one ``state_dict()`` call moved base weights by up to 2.2e-4 and logits by 8.5e-4. Loading an adapter used to call
it, so loading an adapter into a 4-bit model that had already run inference changed its base weights (``test_loading_an_adapter_leaves_a_cpu_repacked_4bit_base_untouched``).
bitsandbytes' extra entries (quant-state tensors, ``SCB``) are not parameters, so they are not here either;
nothing lora_engine reads or writes is one of them.
"""

from __future__ import annotations

import torch
from torch import nn


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` under its ``state_dict()`` key, as the live tensor.

    The keys are ``model.state_dict()``'s less what state-dict hooks add (a shared module appears under each
    of its names, as there); values are the ``Parameter``/buffer objects themselves (``keep_vars=True``), not
    detached copies. Mutates nothing.
    """
    tensors = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                tensors[prefix + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[prefix + name] = buffer
    return tensors


def state_tensor(model: nn.Module, key: str) -> torch.Tensor | None:
    """``state_tensors(model).get(key)``, found by walking only ``key``'s path (a cost independent of the size
    of ``model``); None when no parameter or persistent buffer is there."""
    module = model
    *path, leaf = key.split(".")
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return None
    if module._parameters.get(leaf) is not None:
        return module._parameters[leaf]
    if module._buffers.get(leaf) is not None and leaf not in module._non_persistent_buffers_set:
        return module._buffers[leaf]
    return None
