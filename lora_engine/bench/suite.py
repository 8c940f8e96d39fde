"""Which cases run: the list of cases of each workload family, built from the ``Shapes`` of a (device, mode)."""

from __future__ import annotations

from dataclasses import replace

import torch

from lora_engine.bench import layer_workloads, model_workloads
from lora_engine.bench.case import IMPLS, Case
from lora_engine.bench.shapes import MODES, SHAPES, Shapes

__all__ = ["DROPOUT", "FAMILIES", "MODES", "cases", "mixed_rows"]

FAMILIES = (
    "lora_linear",
    "qlora",
    "decode",
    "train_step",
    "mixed_batch",
    "merge",
    "adapters",
    "memory",
    "dora",
)
DROPOUT = 0.1
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cases(device: str, mode: str, families: tuple[str, ...] = FAMILIES) -> list[Case]:
    """Every case of ``families`` for ``device`` (``"cpu"`` or ``"cuda"``) in ``mode``."""
    shapes = SHAPES[(device, mode)]
    makers = {
        "lora_linear": _lora_linear,
        "qlora": _qlora,
        "decode": _decode,
        "train_step": _train_step,
        "mixed_batch": _mixed_batch,
        "merge": _merge,
        "adapters": _adapters,
        "memory": _memory,
        "dora": _dora,
    }
    unknown = sorted(set(families) - set(makers))
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; choose from {', '.join(FAMILIES)}")
    return [case for family in families for case in makers[family](shapes)]


def _dtype_name(shapes: Shapes, adapters_follow: bool = True) -> str:
    name = DTYPE_NAMES[shapes.dtype]
    if shapes.dtype != torch.float32 and adapters_follow and shapes.adapter_autocast:
        name += " (A, B fp32)"
    return name


def _layer_case(
    shapes,
    family,
    workload,
    label,
    *,
    base,
    layer,
    tokens,
    r,
    dropout,
    training,
    sweep,
    impls=IMPLS,
    use_dora=False,
):
    in_features, out_features = layer
    params = dict(
        base=base,
        in_features=in_features,
        out_features=out_features,
        tokens=tokens,
        r=r,
        dropout=dropout,
        dtype=shapes.dtype,
        training=training,
        adapter_autocast=shapes.adapter_autocast,
    )
    if use_dora:
        params["use_dora"] = True
    return Case(
        family=family,
        workload=workload,
        label=label,
        build=layer_workloads.lora_layer,
        params=params,
        shape=f"N={tokens} {in_features}->{out_features} r={r}",
        dtype=_dtype_name(shapes),
        sweep=sweep,
        impls=impls,
        deterministic=dropout == 0.0,
    )


def _lora_linear(shapes: Shapes) -> list[Case]:
    common = dict(base="dense", layer=shapes.layer, r=shapes.rank)
    rank_tokens = shapes.tokens[-2] if len(shapes.tokens) > 1 else shapes.tokens[0]
    found = []
    for tokens in shapes.tokens:
        at = dict(common, tokens=tokens, sweep=("tokens", tokens))
        found += [
            _layer_case(shapes, "lora_linear", "lora_forward", "forward", dropout=0.0, training=False, **at),
            _layer_case(
                shapes,
                "lora_linear",
                "lora_forward_backward",
                "forward+backward",
                dropout=0.0,
                training=True,
                impls=(*IMPLS, "base"),
                **at,
            ),
            _layer_case(
                shapes,
                "lora_linear",
                "lora_forward_backward",
                f"forward+backward, dropout {DROPOUT}",
                dropout=DROPOUT,
                training=True,
                **at,
            ),
        ]
    found += [
        _layer_case(
            shapes,
            "lora_linear",
            "lora_forward_backward",
            f"forward+backward, N={rank_tokens}, rank sweep",
            base="dense",
            layer=shapes.layer,
            tokens=rank_tokens,
            r=r,
            dropout=0.0,
            training=True,
            sweep=("r", r),
        )
        for r in shapes.ranks
    ]
    found += [
        _layer_case(
            shapes,
            "lora_linear",
            "lora_forward_backward",
            f"forward+backward {layer[0]}->{layer[1]}",
            base="dense",
            layer=layer,
            tokens=tokens,
            r=shapes.rank,
            dropout=0.0,
            training=True,
            sweep=("tokens", tokens),
            impls=(*IMPLS, "base"),
        )
        for layer in shapes.more_layers
        for tokens in shapes.tokens
    ]
    return found


def _dora(shapes: Shapes) -> list[Case]:
    """DoRA forward + backward (magnitude and factor gradients) on a dense layer: peft forms ``W + s·B A``
    each step, ours does not."""
    return [
        _layer_case(
            shapes,
            "dora",
            "dora_forward_backward",
            "DoRA forward+backward",
            base="dense",
            layer=shapes.dora_layer,
            tokens=tokens,
            r=shapes.rank,
            dropout=0.0,
            training=True,
            sweep=("tokens", tokens),
            use_dora=True,
        )
        for tokens in shapes.dora_tokens
    ]


def _qlora(shapes: Shapes) -> list[Case]:
    """The 4-bit LoRA layer (forward, forward + backward) and a tiny Llama's QLoRA training step."""
    return [
        _layer_case(
            shapes,
            "qlora",
            "qlora",
            f"NF4 {'forward+backward' if training else 'forward'}",
            base="nf4",
            layer=shapes.layer,
            tokens=tokens,
            r=shapes.rank,
            dropout=0.0,
            training=training,
            sweep=("tokens", tokens),
        )
        for training in (False, True)
        for tokens in shapes.qlora_tokens
    ] + [
        _train_step_case(shapes, "qlora", "qlora_train_step", "QLoRA training step", seq, 0.0, base="nf4")
        for seq in shapes.qlora_train_seq
    ]


def _decode(shapes: Shapes) -> list[Case]:
    return [
        _layer_case(
            shapes,
            "decode",
            "decode",
            f"{'NF4' if base == 'nf4' else 'dense'} {layer[0]}->{layer[1]}",
            base=base,
            layer=layer,
            tokens=tokens,
            r=shapes.rank,
            dropout=0.0,
            training=False,
            sweep=("tokens", tokens),
        )
        for base in ("dense", "nf4")
        for layer in shapes.decode_layers
        for tokens in shapes.decode_tokens
    ]


def _train_step(shapes: Shapes) -> list[Case]:
    return [
        _train_step_case(shapes, "train_step", "train_step", f"dropout {dropout}", seq, dropout)
        for dropout in (0.0, DROPOUT)
        for seq in shapes.train_seq
    ]


def _train_step_case(shapes, family, workload, label, seq, dropout, base="dense") -> Case:
    dtype = DTYPE_NAMES[shapes.dtype]
    if shapes.train_autocast is not None:
        dtype += f", autocast {DTYPE_NAMES[shapes.train_autocast]}"
    params = dict(
        spec=shapes.llama,
        batch=shapes.train_batch,
        seq=seq,
        r=shapes.rank,
        dropout=dropout,
        dtype=shapes.dtype,
        autocast=shapes.train_autocast,
    )
    if base != "dense":
        params["base"] = base
    return Case(
        family=family,
        workload=workload,
        label=label,
        build=model_workloads.train_step,
        params=params,
        shape=f"{shapes.llama.describe()}{' NF4' if base == 'nf4' else ''} {shapes.train_batch}x{seq} "
        f"r={shapes.rank}",
        dtype=dtype,
        sweep=("tokens", shapes.train_batch * seq),
        deterministic=dropout == 0.0,
    )


def mixed_rows(shapes: Shapes, adapters: int) -> tuple[int, int]:
    """``(rows, seq)`` of a mixed batch over ``adapters`` adapters: ``mixed_batch × mixed_seq``, or one row per
    adapter when there are more adapters than rows, at the same token count."""
    rows = max(shapes.mixed_batch, adapters)
    return rows, max(1, shapes.mixed_batch * shapes.mixed_seq // rows)


def _mixed_batch(shapes: Shapes) -> list[Case]:
    """Row ``b`` runs adapter ``b % adapters``; every adapter count has the same token count (``mixed_rows``),
    so that the time is flat in the number of adapters where the work is."""
    found = []
    for adapters in shapes.mixed_adapters:
        rows, seq = mixed_rows(shapes, adapters)
        found.append(
            Case(
                family="mixed_batch",
                workload="mixed_batch",
                label=f"{rows * seq} tokens",
                build=model_workloads.mixed_batch,
                params=dict(
                    spec=shapes.llama,
                    batch=rows,
                    seq=seq,
                    adapters=adapters,
                    r=shapes.rank,
                    dtype=shapes.dtype,
                ),
                shape=f"{shapes.llama.describe()} {rows}x{seq} {adapters} adapters",
                dtype=_dtype_name(replace(shapes, adapter_autocast=True)),
                sweep=("adapters", adapters),
                impls=(*IMPLS, "base"),
            )
        )
    return found


def _merge(shapes: Shapes) -> list[Case]:
    return [
        Case(
            family="merge",
            workload="merge",
            label=f"{'NF4' if base == 'nf4' else 'dense'} merge+unmerge",
            build=layer_workloads.merge,
            params=dict(
                base=base,
                in_features=shapes.merge_in,
                out_features=out_features,
                r=shapes.rank,
                dtype=shapes.dtype,
            ),
            shape=f"{shapes.merge_in}->{out_features} r={shapes.rank}",
            dtype=DTYPE_NAMES[shapes.dtype],
            sweep=("out_features", out_features),
        )
        for base in ("dense", "nf4")
        for out_features in shapes.merge_out
    ]


def _adapters(shapes: Shapes) -> list[Case]:
    """Switching and loading against the number of adapters loaded."""
    return [
        Case(
            family="adapters",
            workload="adapters",
            label=label,
            build=build,
            params=dict(spec=shapes.llama, adapters=adapters, r=shapes.rank, dtype=shapes.dtype),
            shape=f"{shapes.llama.describe()} {adapters} loaded",
            dtype=_dtype_name(replace(shapes, adapter_autocast=True)),
            sweep=("adapters loaded", adapters),
        )
        for label, build, counts in (
            ("switch (set_adapter)", model_workloads.adapter_switch, shapes.loaded_adapters),
            ("load (load_adapter)", model_workloads.adapter_load, shapes.load_adapters),
        )
        for adapters in counts
    ]


def _memory(shapes: Shapes) -> list[Case]:
    """Issue 17's live-memory sequence: many adapters loaded, a mixed batch over them, all but one deleted."""
    return [
        Case(
            family="memory",
            workload="adapter_memory",
            label="live memory",
            build=model_workloads.adapter_memory,
            params=dict(
                spec=shapes.llama, adapters=shapes.memory_adapters, seq=4, r=shapes.rank, dtype=shapes.dtype
            ),
            shape=f"{shapes.llama.describe()} {shapes.memory_adapters} loaded, mixed batch, "
            f"{shapes.memory_adapters - 1} deleted",
            dtype=_dtype_name(replace(shapes, adapter_autocast=True)),
            sweep=("adapters loaded", shapes.memory_adapters),
            timed=False,
        )
    ]
