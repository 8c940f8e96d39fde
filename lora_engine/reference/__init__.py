"""The reference backend: each op's math in pure PyTorch, one module per op, the oracle for the Triton kernels and
the path that runs on the CPU. Operand checks, dispatch and autograd live in ``lora_engine.ops``."""
