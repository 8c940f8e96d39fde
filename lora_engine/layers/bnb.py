"""LoRA around bitsandbytes' quantized linear layers (QLoRA): ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt``.

``y = base(x) + Σ_active s_a · (drop_a(x) A_aᵀ) B_aᵀ``; the adapters are dense ``lora_A[a]`` / ``lora_B[a]``
(``nn.Linear``, so state-dict keys match peft's). On the reference backend (the CPU by default) the frozen base
runs bitsandbytes' own matmul on the quantized weight and each adapter runs through ``ops.lora_linear`` with no
base weight (in inference, added into the base output in place), except in fp32 training of a 4-bit base, where
the base and the first active adapter run as one ``ops.nf4_lora_linear`` call. On the Triton backend (CUDA by
default, or ``LORA_ENGINE_BACKEND=triton``) a 4-bit base and its first active adapter run as one
``ops.nf4_lora_linear`` call (the weight decoded inside the kernels, for training and inference), later adapters
as before; under ``torch.compile`` on every backend too (the op is then one custom-op node: nothing of
bitsandbytes' matmul is traced), except on a weight bitsandbytes repacked for the CPU (its portable copy cannot be
made inside a graph; bitsandbytes' own matmul reads it). The 8-bit base always runs the first way.

Merging cannot add ``s · B A`` in place into a quantized weight: it dequantizes the weight, adds the delta in
fp32 and quantizes the sum again in the layer's own format (peft's recipe, so merged models equal peft's; on the
CPU with ``bnb_quantize``, bitsandbytes' quantizer bit for bit, ten times faster).
The new quantization rounds, so a merged 4-bit model is not the unmerged one; ``to_dense`` and
``dequantize_bnb_linear`` export an ``nn.Linear`` instead, which keeps the merged weight unrounded (``bnb_export``
does it for a whole model).

Imports bitsandbytes, so ``tuner`` imports this module only when a model holds bitsandbytes layers.
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from lora_engine import backend
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.bnb_quantize import quantize_4bit
from lora_engine.layers.dense import LoraLinear
from lora_engine.ops.lora_linear import lora_linear
from lora_engine.ops.lora_merge import lora_delta
from lora_engine.ops.nf4_dequantize import nf4_dequantize
from lora_engine.ops.nf4_lora_linear import nf4_lora_linear
from lora_engine.ops.nf4_merge import nf4_merge


def is_bnb_linear(module: nn.Module) -> bool:
    """True for the bitsandbytes layers lora_engine wraps: ``Linear4bit`` (or subclass), ``Linear8bitLt``."""
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def wrap_bnb_linear(module_name: str, module: nn.Module) -> LoraLayer:
    """The LoRA wrapper of a bitsandbytes layer; ``ValueError`` for any other bitsandbytes module."""
    if isinstance(module, bnb.nn.Linear4bit):
        return LoraLinear4bit(module)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return LoraLinear8bit(module)
    raise ValueError(
        f"Target module {module_name!r} is a bitsandbytes {type(module).__name__}; lora_engine supports LoRA "
        "on bitsandbytes Linear4bit and Linear8bitLt"
    )


def dequantize_bnb_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``module``'s dequantized weight in ``dtype``, bias copied.

    ``dtype`` None means the 4-bit layer's compute dtype (fp32 if it has none), or fp32 for 8-bit. For
    exporting a quantized model as a plain one: the weight is decoded once and never quantized again.
    """
    return _dense_linear(module, dequantized_weight(module), dtype)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The logical weight ``[out, in]`` of a bitsandbytes linear layer: fp32, on its device, a new tensor."""
    if isinstance(module, bnb.nn.Linear4bit):
        packed_weight, quant_state = _portable_4bit(module.weight)
        return nf4_dequantize(packed_weight, quant_state).float()
    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights: the weight is kept in floating point
        return weight.detach().to(torch.float32, copy=True)
    # Before the first forward the row scales live on the weight, after it on the layer's state.
    row_scales = module.state.SCB if module.state.SCB is not None else weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, row_scales.to(weight.device))


def _portable_4bit(weight: bnb.nn.Params4bit) -> tuple[torch.Tensor, bnb.functional.QuantState]:
    """``(packed weight, quant state)`` in bitsandbytes' portable layout, which ``dequantize_4bit`` reads.

    On CPUs with AVX512-BF16, a no-grad eval forward of ``Linear4bit`` repacks its weight in place into a
    CPU-only layout: nibbles reordered, absmax decoded from double quantization, transposed to
    ``[blocks per row, rows]`` and rounded to bf16. ``dequantize_4bit`` reads that layout as garbage. This
    returns the portable layout without touching the layer: bnb's own inverse for the nibbles, and the bf16
    absmax back in row order as plain fp32 (bnb's inverse would double-quantize it again, rounding twice).
    """
    quant_state = weight.quant_state
    if not _repacked_for_cpu(weight):
        return weight.data, quant_state
    quant_state = copy.deepcopy(quant_state)
    absmax = quant_state.absmax.T.reshape(-1).float()
    quant_state.original_nested = False
    packed_weight, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
    quant_state.absmax = absmax
    return packed_weight, quant_state


def _repacked_for_cpu(weight: bnb.nn.Params4bit) -> bool:
    """Whether bitsandbytes repacked ``weight`` into its CPU-only layout (see ``_portable_4bit``)."""
    return getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)


def _dense_linear(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None) -> nn.Linear:
    """A frozen ``nn.Linear`` shaped like ``module``: ``weight`` (fp32 ``[out, in]``) cast to ``dtype``."""
    if dtype is None:
        dtype = getattr(module, "compute_dtype", None) or torch.float32
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        bias = module.bias.detach().to(device=weight.device, dtype=dtype, copy=True)
        dense.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    return dense


class _BnbLoraLinear(LoraLinear):
    """What the 4-bit and 8-bit wrappers share: forward, merge through requantization, dense export.

    The factors, their init and their state-dict keys are ``LoraLinear``'s. ``in_features`` / ``out_features``
    are the bitsandbytes layer's: a packed 4-bit weight's shape is not the logical one.
    """

    #: Bits of the quantized weight, for messages.
    bits: int

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [..., in]`` → ``[..., out]`` in the dtype of the base layer's output.

        As in peft, outside CUDA autocast each low-rank term (computed in the adapters' dtype) is cast to the
        base output's dtype before the add; under CUDA autocast it is added as it comes (torch's promotion).
        No defensive ``clone`` of the base output, as peft's 4-bit layer has: nothing here writes into it.
        A mixed-adapter batch (``self.routing``) runs ``LoraLinear``'s grouped path on top of the base output.
        """
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = self._add_adapter_output(x, result, name)
        return result

    def _add_adapter_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the base output plus earlier adapters) plus adapter ``name``'s low-rank term.

        Where nothing is recorded for autograd and no dropout or autocast applies (inference), the term is added
        into ``result`` in place, inside the second GEMM (``addmm_``): ``result`` is then a fresh output of the
        base layer or of an earlier adapter, held by nothing else. That is two torch calls instead of four (and
        no ``[..., out]`` temporaries), the same fp32 sums as peft's ``result + lora_B(lora_A(x)) * s``."""
        lora_A, lora_B = self.lora_factors(name)
        dropout_p = self.lora_dropout_p[name] if self.training else 0.0
        scaling = self.scaling[name]
        if (
            dropout_p == 0.0
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and result.dtype == lora_A.dtype
            and result.is_contiguous()
            and isinstance(scaling, float)
        ):
            x_lora_A = torch.nn.functional.linear(
                x if x.dtype == lora_A.dtype else x.to(lora_A.dtype), lora_A
            )
            if result.dim() == 2:  # decoding's [rows, out]: no views to make (each is a dispatch)
                return result.addmm_(x_lora_A, lora_B.T, alpha=scaling)
            rows = result.view(-1, result.shape[-1])
            rows.addmm_(x_lora_A.view(-1, lora_A.shape[0]), lora_B.T, alpha=scaling)
            return result
        delta = lora_linear(x, None, None, lora_A, lora_B, self.scaling[name], dropout_p)
        # peft's exact test: it reads CUDA autocast only, so CPU autocast still casts.
        cast_to_result = not torch.is_autocast_enabled()
        return result + (delta.to(result.dtype) if cast_to_result else delta)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized base weight, ``[out, in]`` fp32."""
        return dequantized_weight(self.base_layer)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` of ``adapter_name``, ``[out, in]``, fp32: a quantized weight has no dtype to match."""
        lora_A, lora_B = self.lora_factors(adapter_name)
        return lora_delta(lora_A, lora_B, self.scaling[adapter_name], fan_in_fan_out=False)

    @torch.no_grad()
    def _apply_delta(self, adapter_name: str, subtract: bool) -> None:
        """Dequantize, add (or subtract) ``s · B A`` in fp32, quantize again; replaces ``base_layer.weight``.

        Not exact: the requantization rounds, and unmerging does not undo it.
        """
        warnings.warn(
            f"{'Unmerge' if subtract else 'Merge'} lora module to {self.bits}-bit linear may get different "
            "generations due to rounding errors. merge_and_unload_dequantized exports the merged model "
            "without requantizing it.",
            stacklevel=3,
        )
        self._merge_delta(self.get_delta_weight(adapter_name), subtract)

    def _merge_delta(self, delta: torch.Tensor, subtract: bool) -> None:
        """The recipe: dequantize, add (or subtract) the fp32 ``delta`` in fp32, quantize again."""
        # In place into the freshly decoded weight: the same sums as out of place, without another fresh
        # weight-sized buffer (on the CPU its first touch costs page faults comparable to the decode itself).
        weight = self.dense_weight()
        self._requantize(weight.sub_(delta) if subtract else weight.add_(delta))

    def _requantize(self, weight: torch.Tensor) -> None:
        """Quantize the fp32 ``weight [out, in]`` in the base layer's format and make it the base weight."""
        raise NotImplementedError

    @torch.no_grad()
    def to_dense(self, adapter_names: list[str], dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized base weight plus ``s · B A`` of ``adapter_names``.

        The sum is formed in fp32 and cast once to ``dtype`` (None: the 4-bit layer's compute dtype, fp32 for
        8-bit); adapters already merged into the quantized weight are not added again. Nothing is quantized
        again, so unlike a merge into the quantized weight this adds no rounding error beyond the cast. The
        wrapper is left as it was.
        """
        weight = self.dense_weight()
        for name in adapter_names:
            if name not in self.merged_adapters:
                weight = weight + self.get_delta_weight(name)
        return _dense_linear(self.base_layer, weight, dtype)


class LoraLinear4bit(_BnbLoraLinear):
    """LoRA wrapper of a bitsandbytes ``Linear4bit`` (NF4 or FP4, with or without double quantization)."""

    bits = 4

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """As ``_BnbLoraLinear.forward``, except that the base and the first active adapter run as one
        ``ops.nf4_lora_linear`` call on the Triton backend, under ``torch.compile`` on any backend (one custom-op
        node; not on a weight bitsandbytes repacked for the CPU), and on the reference backend whenever autograd
        records the call (training: the op decodes the weight again in backward and sums the base and low-rank
        terms inside its GEMMs, where bitsandbytes' matmul plus a separate low-rank term adds full-size tensors).
        Inference on the reference backend keeps bitsandbytes' matmul (on AVX512-BF16 CPUs its fused bf16 kernel,
        about 3x faster than decoding for an fp32 GEMM). Like bitsandbytes' ``Linear4bit.forward``, x is computed
        in the layer's ``compute_dtype`` (set from the first input when it has none) and the result cast back to
        x's dtype."""
        compiling = torch.compiler.is_compiling()
        if (
            self.routing is not None
            or self.disable_adapters
            or (compiling and _repacked_for_cpu(self.base_layer.weight))
        ):
            return super().forward(x, *args, **kwargs)
        always_fused = compiling or backend.uses_triton("nf4_lora_linear", x.device)
        if not always_fused and not torch.is_grad_enabled():
            return super().forward(x, *args, **kwargs)
        self._unmerge_if_disabled()
        active = self._adapters_to_run()
        if not active or not self._fuses_with_base(active[0]):
            return super().forward(x, *args, **kwargs)
        first, *others = active
        lora_A, lora_B = self.lora_factors(first)
        if not always_fused and not self._fuses_on_reference(x, lora_A, lora_B):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        fix_4bit_weight_quant_state_from_module(base)
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute_x = x.to(base.compute_dtype) if base.compute_dtype is not None else x
        bias = base.bias.to(compute_x.dtype) if base.bias is not None else None
        packed, quant_state = _portable_4bit(base.weight)
        dropout_p = self.lora_dropout_p[first] if self.training else 0.0
        result = nf4_lora_linear(
            compute_x, packed, quant_state, bias, lora_A, lora_B, self.scaling[first], dropout_p
        ).to(x.dtype)
        for name in others:
            result = self._add_adapter_output(x, result, name)
        return result

    def _fuses_with_base(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s term can run inside the base's matmul (a plain LoRA adapter can)."""
        return True

    def _fuses_on_reference(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
        """Whether the fused op runs on the reference backend (grad mode is on): when autograd records an fp32
        call (x or the factors requiring grad). In half precision the fused sums round differently from peft's
        separate ones (which our bf16 results equal bit for bit), so there bitsandbytes' matmul plus the
        low-rank term run instead."""
        compute_dtype = self.base_layer.compute_dtype or x.dtype
        if not compute_dtype == x.dtype == lora_A.dtype == torch.float32:
            return False
        return x.requires_grad or lora_A.requires_grad or lora_B.requires_grad

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        # peft's rule: the factors take the layer's compute dtype (the weight itself is packed uint8).
        device, dtype = self.base_layer.weight.device, self.base_layer.compute_dtype
        for param in self.adapter_parameters(adapter_name):
            param.data = param.data.to(device=device, dtype=dtype or param.dtype)

    def _merge_delta(self, delta: torch.Tensor, subtract: bool) -> None:
        """The recipe in one Triton pass (``ops.nf4_merge``) where the backend runs Triton on the weight's device
        (CUDA by default; the CPU under ``LORA_ENGINE_BACKEND=triton``); the recipe elsewhere, and on ROCm (the
        kernel reproduces bnb's NVIDIA build). The op quantizes with the rule bnb's ``quantize_4bit`` has on that
        device, so either way the result is bit for bit what ``_requantize`` of the fp32 sum installs."""
        old = self.base_layer.weight
        if torch.version.hip is not None or not backend.uses_triton("nf4_merge", old.device):
            super()._merge_delta(delta, subtract)
            return
        packed, quant_state = _portable_4bit(old)
        new_packed, absmax = nf4_merge(packed, quant_state, delta, subtract=subtract)
        # The recipe quantizes an fp32 sum, so its state says fp32, as in peft.
        self._install_4bit(new_packed, absmax, tuple(quant_state.shape), torch.float32)

    def _requantize(self, weight: torch.Tensor) -> None:
        old = self.base_layer.weight
        if old.device.type == "cpu":
            # bnb's own CPU quantizer is a torch.bucketize (a binary search per element, most of a merge's time);
            # ours gives the same bits ten times faster. bnb's recipe around it: double quant of the absmax.
            packed, absmax = quantize_4bit(weight, old.blocksize, old.quant_type)
            self._install_4bit(packed, absmax, tuple(weight.shape), weight.dtype)
            return
        new = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=self.base_layer,
        )
        # Moving an unquantized Params4bit to a device quantizes it there (and sets the module's quant_state).
        self.base_layer.weight = new.to(old.device)

    def _install_4bit(
        self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple, dtype: torch.dtype
    ) -> None:
        """Make ``packed`` (``[ceil(numel / 2)]`` uint8) and ``absmax`` (fp32, one per block) of a weight of
        ``shape`` quantized from ``dtype`` the base weight, in the base layer's format, as
        ``bitsandbytes.functional.quantize_4bit`` would have built it (its absmax double-quantized if the layer's
        is)."""
        old = self.base_layer.weight
        offset = state2 = None
        if old.compress_statistics:
            offset = absmax.mean()
            absmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(
            absmax=absmax,
            shape=torch.Size(shape),
            code=bnb.functional.get_4bit_type(old.quant_type, device=old.device),
            blocksize=old.blocksize,
            quant_type=old.quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )
        new = bnb.nn.Params4bit(
            packed.view(old.quant_storage).unsqueeze(1),  # bnb's [bytes / itemsize, 1] layout
            requires_grad=False,
            quant_state=state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=self.base_layer,
            bnb_quantized=True,
        )
        self.base_layer.weight = new
        self.base_layer.quant_state = state


class LoraLinear8bit(_BnbLoraLinear):
    """LoRA wrapper of a bitsandbytes ``Linear8bitLt`` (LLM.int8()); the factors stay in fp32, as in peft."""

    bits = 8

    def _requantize(self, weight: torch.Tensor) -> None:
        old = self.base_layer.weight
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        # Int8Params quantizes only when its data is moved from the CPU (to any device), hence the trip.
        self.base_layer.weight = new.to(old.device)
        # The state still holds the old int8 weight and scales; the next forward takes the new ones.
        self.base_layer.state.reset_grads()
