"""The roofline model printed beside each CUDA case: the least time a call could take on the GPU's peaks.

A case's ``Work`` is the GEMM FLOPs it must do and the HBM bytes it must move at the least: every N×d tensor
(input, output, gradient, keep-mask) counted once per pass the computation needs over it, and each weight once per
pass (forward, and again for the input gradient in backward). Roofline time = max(FLOPs / peak FLOP/s, bytes /
peak bandwidth). Peaks: 790 TFLOP/s bf16 dense GEMM (a sustained Hopper figure, not the datasheet's 989), HBM
4.3 TB/s on an H200 and 3.35 TB/s on an H100, chosen by ``torch.cuda.get_device_name``; any other device gets the
H100's figures, flagged as assumed.

Counted per workload (T tokens, K in-features, M out-features, r rank, e bytes per element):

- LoRA layer forward: 2TKM + 2Tr(K+M) FLOPs; x, y and W once.
- LoRA layer forward + backward (W frozen): 4TKM + 6Tr(K+M) FLOPs; x twice (forward, dA), y, dy, dx once, W twice;
  with dropout a bit-packed keep-mask (TK/8 bytes) written once and read twice.
- DoRA: the LoRA layer's figures (the norm's extra work is left out: a lower bound).
- NF4 bases: the weight at 4 bits plus one absmax byte per 64 weights (double quantization).
- Llama training step: every frozen linear (lm_head included) forward and input-gradient GEMMs, attention's two
  matmuls (forward 4BS²h, backward twice that, per layer), the LoRA terms of every adapted linear; weights twice,
  each linear's activations as in the layer model.
- Mixed batch: a Llama inference forward, every adapter's factors read once.
- Merge + unmerge: the base weight read and written twice, 4rKM FLOPs.
- Adapter registry and memory cases: no roofline (host-side work).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_engine.bench.case import Case

#: bf16 dense GEMM throughput assumed on Hopper, FLOP/s.
GEMM_FLOPS = 790e12
#: HBM bandwidth by GPU name fragment, bytes/s.
HBM_BANDWIDTH = {"H200": 4.3e12, "H100": 3.35e12}
FALLBACK_GPU = "H100"
#: Bytes per weight of an NF4 base: 4 bits plus one quantized absmax byte per block of 64.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64


@dataclass(frozen=True)
class Peaks:
    """The peaks a roofline uses and where they come from."""

    flops: float
    bandwidth: float
    source: str  # the GPU they belong to, or why they were assumed

    def describe(self) -> str:
        return (
            f"roofline peaks: {self.flops / 1e12:.0f} TFLOP/s bf16 dense GEMM, "
            f"HBM {self.bandwidth / 1e12:.3g} TB/s ({self.source})"
        )


def peaks_for(gpu_name: str | None) -> Peaks:
    """The peaks of ``gpu_name`` (``torch.cuda.get_device_name``); None (no GPU: an interpreted run) or a GPU
    outside the table gets the H100's figures, said so in ``source``."""
    for fragment, bandwidth in HBM_BANDWIDTH.items():
        if gpu_name and fragment in gpu_name:
            return Peaks(GEMM_FLOPS, bandwidth, gpu_name)
    reason = f"{gpu_name} is not in the table" if gpu_name else "no GPU: interpreted run"
    return Peaks(GEMM_FLOPS, HBM_BANDWIDTH[FALLBACK_GPU], f"assumed {FALLBACK_GPU} figures, {reason}")


@dataclass(frozen=True)
class Work:
    """What one call must do at the least: GEMM FLOPs and bytes moved to and from HBM."""

    flops: float
    bytes: float

    def seconds(self, peaks: Peaks) -> float:
        return max(self.flops / peaks.flops, self.bytes / peaks.bandwidth)

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)


def _weight_bytes(base: str, in_features: int, out_features: int, element: int) -> float:
    per_weight = NF4_BYTES_PER_WEIGHT if base == "nf4" else element
    return in_features * out_features * per_weight


def linear_work(
    tokens: int,
    in_features: int,
    out_features: int,
    r: int | None,
    element: int,
    *,
    training: bool,
    dropout: float = 0.0,
    base: str = "dense",
) -> Work:
    """One (LoRA) linear layer on ``tokens`` rows: see the module docstring. ``r=None``: no adapter."""
    t, k, m = tokens, in_features, out_features
    weight = _weight_bytes(base, k, m, element)
    lora_flops = 0 if r is None else 2 * t * r * (k + m)
    if not training:
        return Work(2 * t * k * m + lora_flops, element * (t * k + t * m) + weight)
    mask = 3 * t * k / 8 if dropout > 0 and r is not None else 0
    return Work(4 * t * k * m + 3 * lora_flops, element * (3 * t * k + 2 * t * m) + 2 * weight + mask)


def _llama_linears(spec) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear of one decoder layer: q, k, v, o, gate, up, down."""
    kv = spec.hidden * spec.kv_heads // spec.heads
    h, i = spec.hidden, spec.intermediate
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def llama_work(
    spec,
    batch: int,
    seq: int,
    r: int,
    element: int,
    *,
    training: bool,
    dropout: float = 0.0,
    adapters: int = 1,
    base: str = "dense",
) -> Work:
    """A Llama forward (``training``: forward + backward, LoRA on every linear of every layer)."""
    tokens = batch * seq
    work = Work(0.0, 0.0)
    for in_features, out_features in _llama_linears(spec):
        work += linear_work(
            tokens, in_features, out_features, r, element, training=training, dropout=dropout, base=base
        )
        # every further adapter's factors are read once (a mixed batch)
        work += Work(0.0, (adapters - 1) * r * (in_features + out_features) * element)
    attention = Work(4 * batch * seq * seq * spec.hidden * (3 if training else 1), 0.0)
    work = Work((work.flops + attention.flops) * spec.layers, work.bytes * spec.layers)
    return work + linear_work(tokens, spec.hidden, spec.vocab, None, element, training=training)


def work_of(case: Case) -> Work | None:
    """The least work of one call of ``case``; None for workloads the model does not cover."""
    params = case.params
    element = params["dtype"].itemsize
    workload = case.workload
    if workload in ("lora_forward", "lora_forward_backward", "qlora", "decode", "dora_forward_backward"):
        return linear_work(
            params["tokens"],
            params["in_features"],
            params["out_features"],
            params["r"],
            element,
            training=params["training"],
            dropout=params["dropout"],
            base=params["base"],
        )
    if workload in ("train_step", "qlora_train_step"):
        element = params["autocast"].itemsize if params.get("autocast") is not None else element
        return llama_work(
            params["spec"],
            params["batch"],
            params["seq"],
            params["r"],
            element,
            training=True,
            dropout=params["dropout"],
            base="nf4" if workload == "qlora_train_step" else "dense",
        )
    if workload == "mixed_batch":
        return llama_work(
            params["spec"],
            params["batch"],
            params["seq"],
            params["r"],
            element,
            training=False,
            adapters=params["adapters"],
        )
    if workload == "merge":
        k, m, r = params["in_features"], params["out_features"], params["r"]
        return Work(4 * r * k * m, 4 * _weight_bytes(params["base"], k, m, element))
    return None
