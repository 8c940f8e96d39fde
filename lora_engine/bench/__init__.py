"""Benchmarks of lora_engine against peft (+ bitsandbytes): workloads, timing, memory, the report."""
