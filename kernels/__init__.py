"""Triton kernels of lora_engine, installed as `lora_engine.kernels` (never as a top-level `kernels`)."""
