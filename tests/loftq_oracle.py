"""peft 0.21.2's LoftQ as an oracle on a machine without CUDA.

peft's ``loftq_init`` and ``_loftq_init_new`` hard-code their compute device: ``weight.to("cuda")`` (or "xpu"),
so on this CPU-only machine they raise ``AssertionError: Torch not compiled with CUDA enabled`` before any
arithmetic. ``cuda_as_cpu()`` runs peft's own, unmodified code with every device argument naming CUDA replaced by
the CPU (a ``TorchFunctionMode``, which sees each torch call peft and bitsandbytes make): the quantization, the SVD
and the factor assignment are peft's, executed on the CPU with bitsandbytes' CPU backend, which is exactly where
lora_engine computes when there is no CUDA. Nothing else is changed.
"""

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


def _on_cpu(value):
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {key: _on_cpu(value) if key == "device" else value for key, value in (kwargs or {}).items()}
        return func(*(_on_cpu(arg) for arg in args), **kwargs)


@contextmanager
def cuda_as_cpu():
    """Within the block, torch calls asked for a CUDA device get the CPU instead (see the module docstring)."""
    assert not torch.cuda.is_available(), "with CUDA present, run peft's LoftQ as it is"
    with _CudaAsCpu():
        yield
