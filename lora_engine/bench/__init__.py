"""Benchmarks of lora_engine against peft (+ bitsandbytes): workloads, timing, memory, the report.

``main(argv)`` is the ``lora-engine bench`` command (``lora_engine.bench.cli``). The modules, each one idea:
``case`` (what a case and a runner are), ``shapes`` (the sizes per device and mode), ``suite`` (which cases),
``builders`` (identical models for every implementation), ``layer_workloads`` / ``model_workloads`` (what is
run), ``timing`` (interleaved, warm-up excluded), ``memory`` (saved-for-backward bytes, peak memory),
``measure`` (one case, all figures), ``roofline`` (the least time of a CUDA case on the GPU's peaks),
``kernel_choice`` (which dense strategy ``auto`` ran), ``targets``, ``report`` (the table), ``results`` (the
JSON), ``plots`` (the PNGs).

peft is imported only inside this package (and ``benchmarks/``), never by the rest of lora_engine.
"""

from lora_engine.bench.cli import main

__all__ = ["main"]
