"""Workloads on a whole Llama with LoRA on every linear layer: a training step (dense or 4-bit base), a
mixed-adapter batch, the adapter registry (switching the active adapter, loading one from disk) against the
number of adapters loaded, and the live memory of many adapters (issue 17)."""

from __future__ import annotations

import contextlib
import itertools
import re
import tempfile
from pathlib import Path

import torch

from lora_engine.bench.builders import (
    LlamaSpec,
    llama,
    lora_api,
    lora_layers,
    quantize_decoder_linears,
    token_batches,
    trainable_parameters,
    with_lora,
)
from lora_engine.bench.case import Runner
from lora_engine.bench.memory import live_tensor_bytes

#: Batches a runner rotates through, so that no call reuses the previous call's input.
BATCHES = 4


def _lora_llama(impl, device, spec, dtype, r, adapters=1, dropout=0.0, base="dense"):
    model = llama(spec, dtype, device)
    if base == "nf4":
        quantize_decoder_linears(model, dtype)
    return with_lora(
        impl,
        model,
        adapters=adapters,
        target_modules="all-linear",
        r=r,
        lora_alpha=2 * r,
        lora_dropout=dropout,
    )


def train_step(
    impl: str,
    device: torch.device,
    *,
    spec: LlamaSpec,
    batch: int,
    seq: int,
    r: int,
    dropout: float,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    base: str = "dense",
) -> Runner:
    """One optimizer step: causal-LM loss on ``[batch, seq]`` tokens, backward, AdamW on the LoRA factors.

    ``autocast`` runs the forward under ``torch.autocast`` in that dtype (as transformers' Trainer does with
    ``bf16=True``); None runs it in the model's dtype. ``base="nf4"``: QLoRA, the decoder's linears quantized
    to bitsandbytes NF4 (``quantize_decoder_linears``).
    """
    model = _lora_llama(impl, device, spec, dtype, r, dropout=dropout, base=base)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    batches = token_batches(BATCHES, batch, seq, spec.vocab, device)
    turn = itertools.count()

    def precision():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    def loss_of(input_ids):
        with precision():
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    def step():
        loss = loss_of(batches[next(turn) % BATCHES])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Runner(
        run=step,
        forward=lambda: loss_of(batches[0]),
        saved_scope=lora_layers(impl, model),
        parameters=list(model.parameters()),
    )


def mixed_batch(
    impl: str,
    device: torch.device,
    *,
    spec: LlamaSpec,
    batch: int,
    seq: int,
    adapters: int,
    r: int,
    dtype: torch.dtype,
) -> Runner:
    """An inference forward over ``[batch, seq]`` tokens where row ``b`` runs adapter ``a{b % adapters}``
    (``adapter_names=``), with ``adapters`` adapters loaded; for ``impl == "base"`` the same forward of the frozen
    Llama alone (the bound: no implementation's mixed batch can be faster)."""
    if impl == "base":
        model, routing = llama(spec, dtype, device), {}
    else:
        model = _lora_llama(impl, device, spec, dtype, r, adapters=adapters)
        routing = {"adapter_names": [f"a{row % adapters}" for row in range(batch)]}
    model.eval()
    batches = token_batches(BATCHES, batch, seq, spec.vocab, device)
    turn = itertools.count()

    @torch.no_grad()
    def forward():
        input_ids = batches[next(turn) % BATCHES]
        return model(input_ids=input_ids, use_cache=False, **routing).logits

    return Runner(run=forward)


def adapter_switch(
    impl: str, device: torch.device, *, spec: LlamaSpec, adapters: int, r: int, dtype: torch.dtype
) -> Runner:
    """``set_adapter``, alternating between the first and the last of ``adapters`` loaded adapters."""
    model = _lora_llama(impl, device, spec, dtype, r, adapters=adapters)
    names = itertools.cycle(["a0", f"a{adapters - 1}"])
    return Runner(run=lambda: model.set_adapter(next(names)))


def adapter_load(
    impl: str, device: torch.device, *, spec: LlamaSpec, adapters: int, r: int, dtype: torch.dtype
) -> Runner:
    """``load_adapter`` of one saved adapter (peft's file format) into a model with ``adapters`` adapters
    loaded; the untimed reset deletes it again."""
    model = _lora_llama(impl, device, spec, dtype, r, adapters=adapters)
    folder = tempfile.TemporaryDirectory(prefix="lora-engine-bench-")
    write_adapter_folder(Path(folder.name), model, "a0", target_modules="all-linear", r=r, lora_alpha=2 * r)

    def reset():
        if "loaded" in model.peft_config:
            model.delete_adapter("loaded")

    return Runner(
        run=lambda: model.load_adapter(folder.name, adapter_name="loaded"),
        reset=reset,
        keep=[folder],
    )


def adapter_memory(
    impl: str,
    device: torch.device,
    *,
    spec: LlamaSpec,
    adapters: int,
    seq: int,
    r: int,
    dtype: torch.dtype,
) -> Runner:
    """Untimed: live tensor bytes (``memory.live_tensor_bytes``) along issue 17's sequence, each a difference
    from before the base model was built. ``base``: the base model alone; ``loaded``: with ``adapters``
    adapters; ``before_batch`` / ``after_batch``: around one mixed batch with one row per adapter (``seq``
    tokens each); ``after_deletes``: after deleting all adapters but ``a0``; ``one_adapter``: the parameter
    bytes of one adapter."""

    def scenario() -> dict[str, int]:
        start = live_tensor_bytes(device)
        model = llama(spec, dtype, device)
        figures = {"base": live_tensor_bytes(device) - start}
        model = with_lora(impl, model, adapters=adapters, target_modules="all-linear", r=r, lora_alpha=2 * r)
        model.eval()
        figures["loaded"] = figures["before_batch"] = live_tensor_bytes(device) - start
        names = [f"a{index}" for index in range(adapters)]
        (input_ids,) = token_batches(1, adapters, seq, spec.vocab, device)
        with torch.no_grad():
            model(input_ids=input_ids, adapter_names=names, use_cache=False)  # the output is dropped at once
        figures["after_batch"] = live_tensor_bytes(device) - start
        for name in names[1:]:
            model.delete_adapter(name)
        figures["after_deletes"] = live_tensor_bytes(device) - start
        figures["one_adapter"] = sum(
            param.numel() * param.element_size()
            for name, param in model.named_parameters()
            if ".lora_A.a0." in name or ".lora_B.a0." in name
        )
        return figures

    return Runner(run=scenario)


def write_adapter_folder(folder: Path, model: torch.nn.Module, adapter_name: str, **config) -> None:
    """Write ``adapter_name`` of ``model`` as peft saves it: ``adapter_config.json`` by peft's ``LoraConfig``
    and ``adapter_model.safetensors`` with the adapter name dropped from the keys.

    Ours and peft's in-memory keys and adapter weights are identical (see ``builders``), so either
    implementation writes the same bytes, and both load the same file.
    """
    from safetensors.torch import save_file

    in_memory = re.compile(rf"\.(lora_[AB])\.{re.escape(adapter_name)}\.")
    weights = {
        in_memory.sub(r".\1.", key): value.detach().cpu().contiguous()
        for key, value in model.state_dict().items()
        if in_memory.search(key)
    }
    save_file(weights, str(folder / "adapter_model.safetensors"))
    lora_api("peft").LoraConfig(**config).save_pretrained(str(folder))
