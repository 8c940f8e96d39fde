"""The sizes each (device, mode) sweeps: one ``Shapes`` per pair.

Modes: ``smoke`` (tiny, to check the machinery; its figures mean nothing), ``quick`` (under 10 minutes on a
2-core CPU), ``full``. On CUDA the shapes are a 7B Llama's (hidden 4096, intermediate 11008) in bf16, with
1k-16k tokens and ranks 8-64; its whole-model workloads use that Llama's layers, four of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lora_engine.bench.builders import LlamaSpec

MODES = ("smoke", "quick", "full")


@dataclass(frozen=True)
class Shapes:
    """The sizes one (device, mode) sweeps. Layer shapes are ``(in_features, out_features)``."""

    dtype: torch.dtype
    #: Half-precision LoRA factors in fp32 (peft's ``autocast_adapter_dtype``) in the layer workloads.
    adapter_autocast: bool
    layer: tuple[int, int]
    rank: int
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]  # swept at tokens[-2] (or the only token count)
    more_layers: tuple[tuple[int, int], ...]  # forward + backward also at these shapes
    decode_layers: tuple[tuple[int, int], ...]
    decode_tokens: tuple[int, ...]
    qlora_tokens: tuple[int, ...]
    merge_in: int
    merge_out: tuple[int, ...]
    llama: LlamaSpec
    train_batch: int
    train_seq: tuple[int, ...]
    train_autocast: torch.dtype | None
    qlora_train_seq: tuple[
        int, ...
    ]  # the QLoRA training step (NF4 decoder linears) at these sequence lengths
    #: A mixed batch is ``mixed_batch × mixed_seq`` tokens; with more adapters than rows, one row per adapter and
    #: the same token count (``suite.mixed_rows``).
    mixed_batch: int
    mixed_seq: int
    mixed_adapters: tuple[int, ...]
    loaded_adapters: tuple[int, ...]
    dora_layer: tuple[int, int]  # DoRA forward + backward: a shape where peft's [out, in] temporary matters
    dora_tokens: tuple[int, ...]
    #: ``load_adapter`` is timed with these loaded: the last is 99 in the CPU sweeps, issue 17's "100th load".
    load_adapters: tuple[int, ...]
    #: Live memory with this many adapters, after a mixed batch over them, and after deleting all but one.
    memory_adapters: int = 100


_SMOKE = Shapes(
    dtype=torch.float32,
    adapter_autocast=True,
    layer=(64, 64),
    rank=4,
    tokens=(8, 16),
    ranks=(4, 8),
    more_layers=(),
    decode_layers=((64, 64),),
    decode_tokens=(1, 2),
    qlora_tokens=(8,),
    merge_in=64,
    merge_out=(64, 128),
    llama=LlamaSpec(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128),
    train_batch=2,
    train_seq=(8,),
    train_autocast=None,
    qlora_train_seq=(8,),
    mixed_batch=4,
    mixed_seq=8,
    mixed_adapters=(1, 2),
    loaded_adapters=(1, 2),
    dora_layer=(64, 64),
    dora_tokens=(8,),
    load_adapters=(1, 2),
    memory_adapters=3,
)

_CPU_QUICK = Shapes(
    dtype=torch.float32,
    adapter_autocast=True,
    layer=(512, 512),
    rank=16,
    tokens=(256, 1024, 4096),
    ranks=(8, 16, 32, 64),
    more_layers=(),
    decode_layers=((1024, 1024),),
    decode_tokens=(1, 4, 16),
    qlora_tokens=(128, 512, 2048),
    merge_in=1024,
    merge_out=(256, 1024, 4096),
    llama=LlamaSpec(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=2048),
    train_batch=2,
    train_seq=(64, 128, 256),
    train_autocast=None,
    qlora_train_seq=(64,),
    mixed_batch=16,
    mixed_seq=32,
    mixed_adapters=(1, 4, 8, 16, 64),
    loaded_adapters=(1, 4, 16, 64),
    dora_layer=(4096, 4096),
    dora_tokens=(512,),
    load_adapters=(1, 4, 16, 64, 99),
)

_CPU_FULL = replace(
    _CPU_QUICK,
    layer=(1024, 1024),
    tokens=(256, 1024, 4096, 8192),
    more_layers=((1024, 2752), (2752, 1024)),
    decode_layers=((1024, 1024), (1024, 2752)),
    decode_tokens=(1, 2, 4, 8, 16),
    qlora_tokens=(256, 1024, 4096),
    merge_out=(256, 1024, 2752, 4096),
    llama=LlamaSpec(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4, vocab=8192),
    train_seq=(64, 128, 256, 512),
    qlora_train_seq=(128, 512),
    mixed_adapters=(1, 2, 4, 8, 16, 64),
    loaded_adapters=(1, 4, 16, 64, 128),
    load_adapters=(1, 4, 16, 64, 99, 128),
)

_CUDA_FULL = Shapes(
    dtype=torch.bfloat16,
    adapter_autocast=False,
    layer=(4096, 4096),
    rank=16,
    tokens=(1024, 2048, 4096, 8192, 16384),
    ranks=(8, 16, 32, 64),
    more_layers=((4096, 11008), (11008, 4096)),
    decode_layers=((4096, 4096), (4096, 11008)),
    decode_tokens=(1, 2, 4, 8, 16),
    qlora_tokens=(1024, 4096, 8192, 16384),
    merge_in=4096,
    merge_out=(1024, 4096, 11008),
    llama=LlamaSpec(hidden=4096, intermediate=11008, layers=4, heads=32, kv_heads=32, vocab=32000),
    train_batch=1,
    train_seq=(1024, 2048, 4096, 8192, 16384),
    train_autocast=torch.bfloat16,
    qlora_train_seq=(2048, 8192),
    mixed_batch=16,
    mixed_seq=128,
    mixed_adapters=(1, 2, 4, 8, 16, 64),
    loaded_adapters=(1, 8, 32, 128),
    dora_layer=(4096, 4096),
    dora_tokens=(512, 4096),
    load_adapters=(1, 8, 32, 99, 128),
)

_CUDA_QUICK = replace(
    _CUDA_FULL,
    tokens=(2048, 8192),
    ranks=(16, 64),
    more_layers=(),
    decode_layers=((4096, 4096),),
    decode_tokens=(1, 4, 16),
    qlora_tokens=(8192,),
    merge_out=(4096, 11008),
    train_seq=(2048, 8192),
    qlora_train_seq=(2048,),
    mixed_adapters=(1, 4, 8, 16, 64),
    loaded_adapters=(1, 16, 64),
    load_adapters=(1, 16, 64, 99),
)

SHAPES = {
    ("cpu", "smoke"): _SMOKE,
    ("cpu", "quick"): _CPU_QUICK,
    ("cpu", "full"): _CPU_FULL,
    # Layer cases above 64 rows, where the dense strategy is chosen (at most 64 rows always take cublas: decode).
    ("cuda", "smoke"): replace(
        _SMOKE,
        dtype=torch.bfloat16,
        adapter_autocast=False,
        train_autocast=torch.bfloat16,
        tokens=(72,),
        ranks=(8,),
        decode_tokens=(1,),
    ),
    ("cuda", "quick"): _CUDA_QUICK,
    ("cuda", "full"): _CUDA_FULL,
}
