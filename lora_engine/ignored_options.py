"""peft parameters that lora_engine accepts, so that peft code runs unchanged, but that have no effect here.

Each has one line below saying why. ``warn_if_set`` warns when a caller passes anything but the default, so
nobody believes an option took effect when it did not. (``config.py`` does the same for its own fields.)
"""

from __future__ import annotations

import warnings

#: name → why it has no effect in lora_engine.
WHY_IGNORED = {
    "low_cpu_mem_usage": "peft uses it to create adapter weights on the meta device before loading them; "
    "lora_engine's adapters are small and are created directly on the base layer's device",
    "ephemeral_gpu_offload": "peft uses it to move offloaded (CPU/disk) base layers to the GPU while it "
    "initialises or loads an adapter; lora_engine never offloads a base layer",
    "task_ids": "peft uses it to pick the task of a multitask prompt-tuning adapter; LoRA adapters have no "
    "tasks, and peft ignores it for LoRA too",
}


def warn_if_set(name: str, value: object, default: object = None, stacklevel: int = 3) -> None:
    """``UserWarning`` naming ``name`` and ``WHY_IGNORED[name]`` when ``value`` is not ``default``."""
    if value is default or (default is not None and value == default):
        return
    warnings.warn(
        f"{name}={value!r} has no effect in lora_engine: {WHY_IGNORED[name]}",
        UserWarning,
        stacklevel=stacklevel,
    )
