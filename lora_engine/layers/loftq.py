"""LoftQ (Li et al. 2023, arXiv:2310.08659): LoRA factors that absorb a base weight's quantization error.

For a dense weight ``W [out, in]`` and rank ``r``, peft 0.21.2's recipe, step for step (so the same weight gives
the same numbers):

    residual = W
    repeat loftq_iter times:
        Q = dequantize(quantize(residual))      # bitsandbytes NF4 (blocksize 64, no double quant) or int8
        L, R = rank-r SVD factors of W − Q      # L = U_r √S_r  [out, r],  R = √S_r V_rᵀ  [r, in]
        residual = W − L R                      # (not after the last round)
    lora_A, lora_B = R, L;  the base weight becomes Q (the dequantized quantized weight, in W's dtype)

so that ``Q + B A ≈ W``. The scaling ``s = alpha / r`` is not applied, as in peft.

Where it runs: peft 0.21.2 hard-codes its compute device to "cuda" (or "xpu"), so on a machine without one its
LoftQ cannot run at all; here it runs on CUDA when there is one (the same bitsandbytes calls as peft, so peft's
numbers) and otherwise on the CPU, through bitsandbytes' CPU backend.

``loftq_residual_factors`` is the one-shot variant for a base that is already a bitsandbytes 4-bit layer
(``replace_lora_weights_loftq``): ``Q`` is that layer's own weight and ``W`` the original one, read from a file.
"""

from __future__ import annotations

import torch

NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which peft's LoftQ uses


def compute_device(weight: torch.Tensor) -> torch.device:
    """Where LoftQ's arithmetic runs for ``weight``: its own accelerator, else CUDA if present (as peft, which
    always moves the weight there), else the CPU."""
    if weight.device.type != "cpu":
        return weight.device
    return torch.device("cuda") if torch.cuda.is_available() else weight.device


def low_rank_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L [m, r], R [r, n])`` with ``L R`` the best rank-``r`` approximation of the fp32 ``matrix [m, n]``.

    ``L = U[:, :r] √S_r`` and ``R = √S_r Vh[:r]`` from ``torch.linalg.svd`` (not ``full_matrices``). peft forms
    them as products with the dense ``√diag(S)`` sliced to ``r`` columns/rows; each entry of that product has a
    single non-zero term, so scaling the columns/rows directly gives the same bits without the ``[k, k]`` matrix.
    """
    if matrix.dim() != 2:
        raise ValueError(f"LoftQ decomposes 2-D weights only, got a weight of shape {tuple(matrix.shape)}")
    left, singular, right_h = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(singular[:r])
    return left[:, :r] * root, root[:, None] * right_h[:r]


def quantize_roundtrip(matrix: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``dequantize(quantize(matrix))`` for the fp32 ``matrix [out, in]``, fp32 on its device: bitsandbytes NF4
    (blocksize 64, absmax in fp32) for 4 bits, bitsandbytes' row-wise int8 (through fp16, as ``Int8Params``
    quantizes) for 8 bits."""
    import bitsandbytes as bnb  # only LoftQ needs it at init time

    if num_bits == 4:
        packed, quant_state = bnb.functional.quantize_4bit(
            matrix.contiguous(),
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=False,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        return bnb.functional.dequantize_4bit(packed, quant_state)
    if num_bits == 8:
        int8_rows, row_scales, _ = bnb.functional.int8_vectorwise_quant(matrix.contiguous().to(torch.float16))
        return bnb.functional.int8_vectorwise_dequant(int8_rows, row_scales)
    raise ValueError(f"loftq_bits={num_bits!r}: only nf4 (4) and int8 (8) quantization is supported")


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor, num_bits: int, r: int, num_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q in weight's dtype and device, lora_A [r, in] fp32, lora_B [out, r] fp32)`` for ``weight [out, in]``.

    ``weight`` is not mutated; the caller writes ``Q`` into the base layer. The factors stay on the compute
    device (see the module docstring). ``ValueError`` for ``num_iter < 1`` or another ``num_bits`` than 4 or 8;
    ``TypeError`` for a weight that is not floating point (a quantized base: LoftQ quantizes it itself).
    """
    if not weight.dtype.is_floating_point:
        raise TypeError(
            f"init_lora_weights='loftq' needs a floating-point base weight, got {weight.dtype}; LoftQ quantizes "
            "the base itself, so load the model unquantized (for an already quantized model, use "
            "replace_lora_weights_loftq)"
        )
    if num_iter <= 0:
        raise ValueError(f"loftq_iter={num_iter!r}: the number of iterations must be greater than 0")
    original = weight.detach().to(device=compute_device(weight), dtype=torch.float32)
    residual = original
    for round_index in range(num_iter):
        # As peft: NF4 is quantized on the compute device, int8 on the weight's own device (Int8Params).
        quantize_on = residual if num_bits == 4 else residual.to(weight.device)
        dequantized = quantize_roundtrip(quantize_on, num_bits).to(residual.device)
        lora_B, lora_A = low_rank_factors(original - dequantized, r)
        if round_index + 1 < num_iter:
            residual = original - torch.mm(lora_B, lora_A)
    return dequantized.to(device=weight.device, dtype=weight.dtype), lora_A, lora_B


@torch.no_grad()
def loftq_residual_factors(
    dequantized: torch.Tensor, original: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A [r, in], lora_B [out, r])``, fp32: the rank-``r`` SVD factors of ``original − dequantized``.

    ``dequantized`` is a quantized layer's decoded weight, ``original`` the weight it was quantized from (both
    ``[out, in]``, any float dtype); computed on ``compute_device(dequantized)``. ``ValueError`` on a shape
    mismatch, naming both shapes.
    """
    if original.shape != dequantized.shape:
        raise ValueError(
            f"the original weight has shape {tuple(original.shape)} but the quantized layer's weight is "
            f"{tuple(dequantized.shape)}; the file does not hold this model's weights"
        )
    device = compute_device(dequantized)
    residual = original.to(device=device, dtype=torch.float32) - dequantized.to(
        device=device, dtype=torch.float32
    )
    lora_B, lora_A = low_rank_factors(residual, r)
    return lora_A, lora_B
