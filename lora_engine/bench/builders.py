"""Models for the benchmarks, identical across implementations: base layers, a Llama, LoRA on top.

Everything here is a function of a seed: the same arguments build the same base weights, the same adapter weights
(each LoRA tensor is drawn from a generator seeded by its state-dict key, and ours and peft's in-memory keys are
identical) and the same inputs, whichever implementation asks and in whichever process. That is what lets the
peak-RSS child build one implementation alone.

peft and bitsandbytes are imported here, and only when a function needs them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a Llama built from a config (never downloaded)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return f"Llama h={self.hidden} i={self.intermediate} L={self.layers} V={self.vocab}"


class SingleLayer(nn.Module):
    """A model holding one layer, ``proj``, so that ``get_peft_model`` can wrap a bare layer."""

    def __init__(self, layer: nn.Module, loaded_in_4bit: bool = False) -> None:
        super().__init__()
        self.proj = layer
        # peft dispatches to its bitsandbytes 4-bit LoRA layer only on models flagged as loaded in 4-bit.
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def seeded_randn(
    shape, seed: int, device: torch.device, dtype: torch.dtype, std: float = 1.0
) -> torch.Tensor:
    """``N(0, std²)`` samples that depend only on ``seed``, ``shape``, the device type and ``dtype``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)


def dense_linear(
    in_features: int, out_features: int, dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Linear:
    """A frozen bias-free ``nn.Linear`` (as in Llama) with weights ``N(0, 1/in)``."""
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    weight = seeded_randn((out_features, in_features), seed, device, dtype, std=in_features**-0.5)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def nf4_linear(
    in_features: int, out_features: int, compute_dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4, double quantization, as QLoRA uses it) quantized from
    ``dense_linear``'s weights; quantization is deterministic, so the same seed gives the same packed weight."""
    return nf4_from_dense(dense_linear(in_features, out_features, compute_dtype, device, seed), compute_dtype)


def nf4_from_dense(dense: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """``dense`` (bias-free) quantized to a frozen bitsandbytes ``Linear4bit``: NF4, double quantization,
    computing in ``compute_dtype``, on ``dense``'s device."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        dense.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    )
    layer.weight = weight.to(dense.weight.device)  # moving an unquantized Params4bit quantizes it
    return layer


def quantize_decoder_linears(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """``model`` (a transformers causal LM, mutated) with every ``nn.Linear`` of its decoder layers replaced by
    ``nf4_from_dense`` of it, and flagged as loaded in 4-bit as transformers' quantized loading flags it (the
    embeddings and ``lm_head`` stay dense, as QLoRA keeps them)."""
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name), child, nf4_from_dense(module, compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def base_layer(
    kind: str, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Module:
    """``kind`` ``"dense"`` (``nn.Linear`` in ``dtype``) or ``"nf4"`` (4-bit, computing in ``dtype``)."""
    if kind == "dense":
        return dense_linear(in_features, out_features, dtype, device, seed)
    if kind == "nf4":
        return nf4_linear(in_features, out_features, dtype, device, seed)
    raise ValueError(f"base layer kind {kind!r} is not one of 'dense', 'nf4'")


def llama(spec: LlamaSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of shape ``spec`` with transformers' random init, fixed by ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=32768,
    )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def token_batches(
    count: int, batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """``count`` batches of token ids ``[batch, seq]``; rotating through them keeps every call on fresh data."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(count)]


def lora_api(impl: str):
    """The module whose ``LoraConfig`` / ``get_peft_model`` ``impl`` uses: ``lora_engine`` or ``peft``."""
    if impl == "ours":
        import lora_engine

        return lora_engine
    if impl == "peft":
        import peft

        return peft
    raise ValueError(f"implementation {impl!r} has no LoRA API; expected 'ours' or 'peft'")


def with_lora(
    impl: str,
    model: nn.Module,
    adapters: int = 1,
    autocast_adapter_dtype: bool = True,
    **config,
) -> nn.Module:
    """``model`` (mutated) wrapped by ``impl``'s ``get_peft_model`` with ``adapters`` adapters named ``a0``,
    ``a1``, ... (``a0`` active), all from ``LoraConfig(**config)``, their weights set by ``fill_adapters``."""
    api = lora_api(impl)
    peft_model = api.get_peft_model(
        model, api.LoraConfig(**config), adapter_name="a0", autocast_adapter_dtype=autocast_adapter_dtype
    )
    for index in range(1, adapters):
        peft_model.add_adapter(
            f"a{index}", api.LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype
        )
    fill_adapters(peft_model)
    return peft_model


@torch.no_grad()
def fill_adapters(model: nn.Module, std_B: float = 0.1) -> None:
    """Set every LoRA factor from a generator seeded by its state-dict key: ``A ~ N(0, 1/in)``,
    ``B ~ N(0, std_B²/r)``. peft's init leaves ``B`` at zero, which would make every adapter a no-op and every
    output comparison vacuous."""
    for name, param in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        std = param.shape[1] ** -0.5 * (std_B if ".lora_B." in name else 1.0)
        seed = zlib.crc32(name.encode())
        param.copy_(seeded_randn(param.shape, seed, torch.device("cpu"), torch.float32, std))


def lora_layers(impl: str, model: nn.Module) -> list[nn.Module]:
    """The LoRA wrapper modules of ``impl`` in ``model``."""
    if impl == "ours":
        from lora_engine.layers.base import LoraLayer
    else:
        from peft.tuners.lora.layer import LoraLayer
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]
