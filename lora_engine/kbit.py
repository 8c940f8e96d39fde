"""k-bit (quantized) base models: ``nf4_config``, the 4-bit format the demo's QLoRA and ``lora-engine merge
--load-in-4bit`` load a base in, and ``prepare_model_for_kbit_training``, which gets a (usually quantized)
transformers model ready for adapter training.

The steps of ``prepare_model_for_kbit_training`` and their order are peft 0.21.2's (``peft/utils/other.py``), so a
model prepared here is, parameter for parameter and flag for flag, the model peft would have prepared.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch

# Quantization methods (transformers' ``model.quantization_method``) whose weights are stored in their own formats:
# their float parameters are left as they are, but the model still counts as quantized for gradient checkpointing.
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's 4-bit recipe as a ``transformers.BitsAndBytesConfig``: NF4 weights with double quantization.

    Pass it as ``quantization_config`` to a transformers ``from_pretrained``, which then turns the model's
    ``nn.Linear`` layers (not the output head) into bitsandbytes ``Linear4bit`` layers whose forward dequantizes
    their weight to ``compute_dtype`` (fp32, bf16 or fp16). Builds a new config on every call; mutates nothing.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_model_for_kbit_training(
    model,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
):
    """Freeze a transformers model, upcast its half-precision parameters, and (if quantized) turn on checkpointing.

    In place, in this order:

    1. every parameter gets ``requires_grad=False``;
    2. unless the model is GPTQ, AQLM, EETQ, torchao or HQQ quantized, every fp16 or bf16 parameter that is not a
       bitsandbytes ``Params4bit`` becomes fp32 (``param.data`` is replaced, the ``Parameter`` object stays): norms,
       embeddings, ``lm_head`` and biases. 4-bit packed weights (uint8) and 8-bit weights (int8) are left alone.
       Then, if ``auto_clear_cache``, the CUDA and XPU caching allocators are emptied where available;
    3. if the model is quantized (bitsandbytes 4-bit or 8-bit, or one of the methods above) and
       ``use_gradient_checkpointing``:

       - when ``gradient_checkpointing_kwargs`` has no ``use_reentrant`` or it is true, the input embeddings' output
         is made to require grad (``model.enable_input_require_grads()``, else a forward hook on
         ``model.get_input_embeddings()``), so that reentrant checkpointing of frozen layers still back-propagates;
       - ``model.gradient_checkpointing_enable`` is called, with ``gradient_checkpointing_kwargs`` if its signature
         takes them (otherwise non-empty kwargs are dropped with a ``FutureWarning``).

    A model that is not quantized is frozen and upcast, and gets no gradient checkpointing.

    Args:
        model: a ``transformers.PreTrainedModel`` (or anything exposing the same attributes).
        use_gradient_checkpointing: enable gradient checkpointing on a quantized model.
        gradient_checkpointing_kwargs: passed on to ``torch.utils.checkpoint.checkpoint``, e.g.
            ``{"use_reentrant": False}``. ``None`` means ``{}``.
        auto_clear_cache: empty the accelerator cache after the upcast.

    Returns:
        ``model`` itself, mutated.
    """
    # transformers stores a ``QuantizationMethod``, a str enum, so it compares equal to the plain names.
    quantization_method = getattr(model, "quantization_method", None)
    skips_upcast = quantization_method in _NO_UPCAST_METHODS or getattr(model, "hqq_quantized", False)
    loaded_in_bnb = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    gradient_checkpointing_kwargs = (
        {} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
    )

    for param in model.parameters():
        param.requires_grad = False

    if not skips_upcast:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and not _is_params4bit(param):
                param.data = param.data.to(torch.float32)
        if auto_clear_cache:
            # The fp32 copies leave the half-precision storage cached; hand it back (peft issue #3265).
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if hasattr(torch, "xpu") and torch.xpu.is_available():
                torch.xpu.empty_cache()

    if (loaded_in_bnb or skips_upcast) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            # Reentrant checkpointing only back-propagates through a segment whose input requires grad; with every
            # base parameter frozen, that has to be forced at the embeddings.
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(_make_output_require_grad)

        takes_kwargs = (
            "gradient_checkpointing_kwargs"
            in inspect.signature(model.gradient_checkpointing_enable).parameters
        )
        if takes_kwargs:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn(
                    f"{type(model).__name__}.gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; "
                    f"ignoring {gradient_checkpointing_kwargs!r}. A transformers newer than 4.34.1 accepts them.",
                    FutureWarning,
                )
            model.gradient_checkpointing_enable()
    return model


def _is_params4bit(param: torch.Tensor) -> bool:
    # A Params4bit can only exist once bitsandbytes is imported, so there is no need to import it here.
    bitsandbytes = sys.modules.get("bitsandbytes")
    return bitsandbytes is not None and isinstance(param, bitsandbytes.nn.Params4bit)


def _make_output_require_grad(module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
    output.requires_grad_(True)
