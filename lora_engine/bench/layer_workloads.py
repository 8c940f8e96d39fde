"""Workloads on one layer: a LoRA linear layer (dense or NF4 base) in inference or training, and merge + unmerge.

Small shapes fit in the GPU's L2 cache (a 4096 × 4096 NF4 weight is 8.7 MB, H100's L2 50 MB), where back-to-back
calls would read warm data and measure the cache rather than the kernel: each runner holds enough independent
copies (weights and inputs) that rotating through them touches about twice the cache per cycle.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch

from lora_engine.bench.builders import SingleLayer, base_layer, seeded_randn, trainable_parameters, with_lora
from lora_engine.bench.case import Runner

#: Assumed last-level cache of a CPU; the GPU's L2 size is read from the device.
CPU_CACHE_BYTES = 32 * 2**20
MAX_COPIES = 16


def rotation_copies(bytes_per_copy: int, device: torch.device) -> int:
    """How many independent copies a runner needs so that one pass over them touches twice the cache."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    else:
        cache = CPU_CACHE_BYTES
    return max(1, min(MAX_COPIES, math.ceil(2 * cache / max(bytes_per_copy, 1))))


def weight_bytes(kind: str, in_features: int, out_features: int, dtype: torch.dtype) -> int:
    element_bits = 4 if kind == "nf4" else torch.finfo(dtype).bits
    return in_features * out_features * element_bits // 8


def _layer_model(
    impl, kind, in_features, out_features, r, dropout, dtype, device, seed, adapter_autocast, use_dora
):
    """``(layer to call, trainable parameters, all parameters)`` of copy ``seed``: the LoRA-wrapped base layer,
    or for ``impl == "base"`` the frozen base layer alone."""
    layer = base_layer(kind, in_features, out_features, dtype, device, seed)
    if impl == "base":
        return layer, [], list(layer.parameters())
    model = with_lora(
        impl,
        SingleLayer(layer, loaded_in_4bit=kind == "nf4"),
        autocast_adapter_dtype=adapter_autocast,
        target_modules=["proj"],
        r=r,
        lora_alpha=2 * r,
        lora_dropout=dropout,
        use_dora=use_dora,
    )
    return model.base_model.model.proj, trainable_parameters(model), list(model.parameters())


def lora_layer(
    impl: str,
    device: torch.device,
    *,
    base: str,
    in_features: int,
    out_features: int,
    tokens: int,
    r: int,
    dropout: float,
    dtype: torch.dtype,
    training: bool,
    adapter_autocast: bool,
    use_dora: bool = False,
) -> Runner:
    """A LoRA (or, with ``use_dora``, DoRA) linear layer on ``x [tokens, in]``.

    Training: one forward and one backward (gradients for ``x`` and the LoRA factors), the LoRA layer in train
    mode (dropout active). Inference: one forward under ``no_grad`` in eval mode. ``base`` is ``"dense"`` or
    ``"nf4"``; ``adapter_autocast`` keeps half-precision adapters in fp32 (peft's default) or in ``dtype``.
    """
    activation_bytes = tokens * (in_features + out_features) * torch.finfo(dtype).bits // 8
    copies = rotation_copies(
        weight_bytes(base, in_features, out_features, dtype) + activation_bytes * (2 if training else 1),
        device,
    )
    instances, all_parameters = [], []
    for copy in range(copies):
        layer, trainable, parameters = _layer_model(
            impl, base, in_features, out_features, r, dropout, dtype, device, copy, adapter_autocast, use_dora
        )
        layer.train(training)
        all_parameters += parameters
        x = seeded_randn((tokens, in_features), 1000 + copy, device, dtype).requires_grad_(training)
        grad_out = seeded_randn((tokens, out_features), 2000 + copy, device, dtype) if training else None
        instances.append((layer, x, grad_out, trainable))
    turn = itertools.count()

    def train_step():
        layer, x, grad_out, trainable = instances[next(turn) % copies]
        out = layer(x)
        out.backward(grad_out)
        grad_x, x.grad = x.grad, None
        for param in trainable:
            param.grad = None
        return out.detach(), grad_x

    @torch.no_grad()
    def infer():
        layer, x, _, _ = instances[next(turn) % copies]
        return layer(x)

    def forward_only():
        layer, x, _, _ = instances[0]
        return layer(x)

    return Runner(
        run=train_step if training else infer,
        forward=forward_only if training else None,
        parameters=all_parameters,
        copies=copies,
    )


def merge(
    impl: str,
    device: torch.device,
    *,
    base: str,
    in_features: int,
    out_features: int,
    r: int,
    dtype: torch.dtype,
) -> Runner:
    """``merge_adapter()`` then ``unmerge_adapter()`` on a model of one LoRA layer; the weight ends as it began
    (dense: up to rounding; 4-bit: requantized twice, as both libraries do)."""
    copies = rotation_copies(weight_bytes(base, in_features, out_features, dtype), device)
    models = [
        with_lora(
            impl,
            SingleLayer(base_layer(base, in_features, out_features, dtype, device, copy), base == "nf4"),
            target_modules=["proj"],
            r=r,
            lora_alpha=2 * r,
        )
        for copy in range(copies)
    ]
    turn = itertools.count()

    def merge_and_unmerge():
        model = models[next(turn) % copies]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both libraries warn that a 4-bit merge rounds
            model.merge_adapter()
            model.unmerge_adapter()

    # Dense: the base weight is read and written twice; the [out, r] and [r, in] factors are negligible.
    moved = 4 * weight_bytes(base, in_features, out_features, dtype) if base == "dense" else None
    return Runner(run=merge_and_unmerge, bytes_moved=moved, copies=copies)
