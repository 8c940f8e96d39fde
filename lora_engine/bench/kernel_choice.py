"""Which strategy the dense LoRA linear's ``LORA_ENGINE_LORA_GEMM=auto`` ran for a case (``fused`` or ``cublas``,
issue 12), or the 4-bit one's ``LORA_ENGINE_NF4_GEMM=auto`` (``gemv`` up to 64 rows, else ``dequant``, ``fused`` or
``cublas``, issue 13), asked of the kernels after the case ran, when the choice is cached.

Only for runs whose LoRA layers run the Triton kernels (a CUDA run, or the CUDA sweep interpreted on the CPU):
importing ``lora_engine.kernels`` elsewhere would compile nothing useful.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lora_engine.bench.case import Case

#: Workloads whose LoRA layer has a dense base weight, which the strategy choice is about.
DENSE_LAYER_WORKLOADS = ("lora_forward", "lora_forward_backward", "decode", "dora_forward_backward")


def dense_strategy(case: Case, device: torch.device) -> str | None:
    """``"fused"`` or ``"cublas"`` as the kernels report it for ``case``'s layer shape, ``"not chosen"`` where
    ``auto`` has not timed it; None for a case without a dense LoRA layer."""
    params = case.params
    if case.workload not in DENSE_LAYER_WORKLOADS or params.get("base") != "dense":
        return None
    from lora_engine.kernels.lora_linear import strategy_for

    dtype = params["dtype"]
    # The layer hands the op its factors as they are stored: fp32 when half-precision adapters are autocast.
    adapter_dtype = torch.float32 if params["adapter_autocast"] and dtype != torch.float32 else dtype
    x = torch.empty(0, params["in_features"], dtype=dtype, device=device)
    lora_A = torch.empty(params["r"], params["in_features"], dtype=adapter_dtype, device=device)
    lora_B = torch.empty(params["out_features"], params["r"], dtype=adapter_dtype, device=device)
    return strategy_for(params["tokens"], x, lora_A, lora_B) or "not chosen"


#: Workloads whose LoRA layer has a 4-bit base (``base="nf4"``), which ``LORA_ENGINE_NF4_GEMM`` is about.
NF4_LAYER_WORKLOADS = ("qlora", "decode")


def nf4_strategy(case: Case, device: torch.device) -> str | None:
    """``"gemv"``, ``"dequant"``, ``"fused"`` or ``"cublas"`` as the kernels report it for ``case``'s 4-bit layer,
    ``"not chosen"`` where ``auto`` has not timed it; None for a case without a 4-bit LoRA layer."""
    params = case.params
    if case.workload not in NF4_LAYER_WORKLOADS or params.get("base") != "nf4":
        return None
    from lora_engine.kernels.nf4_lora_linear import strategy_for

    dtype = params["dtype"]
    adapter_dtype = torch.float32 if params["adapter_autocast"] and dtype != torch.float32 else dtype
    # As builders.nf4_linear quantizes it: NF4, double quant, bnb's default blocksize, from a weight in dtype.
    quant_state = SimpleNamespace(
        shape=(params["out_features"], params["in_features"]), quant_type="nf4", blocksize=64, nested=True,
        dtype=dtype,
    )  # fmt: skip
    x = torch.empty(0, params["in_features"], dtype=dtype, device=device)
    lora_A = torch.empty(params["r"], params["in_features"], dtype=adapter_dtype, device=device)
    return strategy_for(params["tokens"], x, quant_state, lora_A) or "not chosen"
