"""Triton kernels of lora_engine, installed as `lora_engine.kernels` (never as a top-level `kernels`).

The Triton backend's math, one module per op (``lora_linear``, ``lora_merge``, ``nf4_dequantize``, ``nf4_merge``,
``nf4_lora_linear``, ``grouped_lora``, ``dora_norm``: the ``forward``/``backward`` or in-place function ``ops/``
dispatches to), plus the kernels they launch (``fused_linear``, ``low_rank``, ``grad_out_pass``) and what the
kernels share (``_utils``; the 4-bit decode every NF4/FP4 kernel calls, ``nf4_decode``). Operand checks, dispatch
and autograd live in ``lora_engine.ops``. Imported only
through the ops, lazily: triton fixes compiled-vs-interpreted when a kernel module is imported.
"""
