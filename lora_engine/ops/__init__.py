"""The ops: one module per op, each owning its contract (docstring), its operand checks, its dispatch and, where
gradients flow, its ``torch.autograd.Function``. Backends hold only math, with one signature per op:
``reference/<op>.py`` (PyTorch) and ``lora_engine.kernels.<op>`` (Triton launchers), so both raise the same errors
and compute W/bias gradients the same way. An op without a Triton kernel says so (``backend.require_reference``).
Arrows: ops → backend, reference, kernels (lazily); never back."""
