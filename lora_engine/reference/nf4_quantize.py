"""Pure-PyTorch emulation of bitsandbytes' CUDA 4-bit quantizer (``quantize_4bit`` on a CUDA tensor): the oracle of
``nf4_merge``'s CUDA rule on a machine without a GPU.

bnb 0.50's CUDA ``quantize_4bit`` runs ``kQuantizeBlockwise`` (``kQuantizeBlockwiseSmall`` for blocksizes 32 and
64; csrc/kernels.cu, csrc/ops.cu), built with ``--use_fast_math``. Per block of ``blocksize`` consecutive elements
of the flattened input (the last block may be partial; its missing elements are loaded as 0):

- ``absmax = max |x|`` over the block (the stored scale); ``r = 1.0f / absmax`` and each element becomes
  ``x * r`` in fp32. Full and partial blocks alike; no clamp, so an all-zero block has ``r = inf`` and ``0 * inf``
  is NaN.
- The index is found by a binary tree of ``x > t`` tests against literal thresholds (``dQuantizeNF4`` and
  ``dQuantizeFP4``), not by nearest code: NF4's index is the number of its 15 thresholds strictly below the
  scaled value; FP4's is the sign (8 when the value is ``< 0``) plus a magnitude index from 7 thresholds on
  ``|x|``. NaN fails every test and lands on index 0.
- Two indices per byte, the high nibble first; with an odd element count the last byte's low nibble is the
  index of a padding 0 scaled by the last block's ``r``.

What ``--use_fast_math`` changes, read from the sm_90 SASS of bnb 0.50.2's ``libbitsandbytes_cuda*.so`` (the
same in its CUDA 11.8 to 13.2 builds): subnormals are flushed to zero on input and output (``FMNMX.FTZ`` for the
absmax, ``FMUL.FTZ`` for the scaling, ``FSETP.GT.FTZ`` for the tests), and ``1.0f / absmax`` is ``MUFU.RCP``, the
hardware's approximate reciprocal (``rcp.approx.ftz.f32``, within 1 ulp). This module takes the correctly rounded
reciprocal instead: NVIDIA does not publish MUFU.RCP's rounding, so the two agree wherever it rounds correctly
(expected at least for powers of two, whose reciprocal is exact) and may differ by one ulp elsewhere, which
changes an index only where a scaled value lies within about an ulp of a threshold. ``nf4_merge`` compiled for
CUDA issues MUFU.RCP itself, so on a GPU it is compared with bnb directly
(``tests/kernel_ops/test_nf4_merge_cuda_rule.py``); everything else here is bit-exact by construction.
"""

from __future__ import annotations

import torch

# The thresholds as the GPU compares against them: bnb's decimal literals rounded once to fp32, as nvcc does (the
# immediates of the FSETPs in the SASS). Written in hex because Python's route, decimal → float64 → float32, rounds
# twice and lands one ulp off for four of NF4's (0.8614784181118011, 0.5016634166240692, 0.1202552504837513,
# -0.8480964004993439 sit almost halfway between two fp32 values).
NF4_THRESHOLDS = torch.tensor(
    [
        float.fromhex(value)
        for value in (
            "-0x1.b239b2p-1",  # -0.8480964004993439
            "-0x1.38a4e0p-1",  # -0.6106329262256622
            "-0x1.d70900p-2",  # -0.4599952697753906
            "-0x1.5bd4ecp-2",  # -0.33967943489551544
            "-0x1.e079d8p-3",  # -0.23460740596055984
            "-0x1.1a7178p-3",  # -0.13791173323988914
            "-0x1.74f0e2p-5",  # -0.045525018125772476
            "0x1.45f5fep-5",  # 0.03979014977812767
            "0x1.ec90c6p-4",  # 0.1202552504837513
            "0x1.a0cfc0p-3",  # 0.2035212516784668
            "0x1.2b05a8p-2",  # 0.2920137718319893
            "0x1.8ea7f2p-2",  # 0.3893125355243683
            "0x1.00da06p-1",  # 0.5016634166240692
            "0x1.491b5ep-1",  # 0.6427869200706482
            "0x1.b913b2p-1",  # 0.8614784181118011
        )
    ],
    dtype=torch.float32,
)

# FP4's magnitude thresholds (on |x|), ascending, and the 3-bit code of each interval between them: 0b000 up to
# the first, 0b001 above it, then 0b110, 0b111, 0b100, 0b101, 0b010, 0b011 (dQuantizeFP4's tree).
FP4_THRESHOLDS = torch.tensor(
    [
        float.fromhex(value)
        for value in (
            "0x1.555572p-9",  # 0.00260417
            "0x1.600000p-4",  # 0.0859375
            "0x1.aaaaaap-3",  # 0.20833333
            "0x1.2aaaaap-2",  # 0.29166667
            "0x1.aaaaacp-2",  # 0.4166667
            "0x1.2aaaa0p-1",  # 0.583333
            "0x1.aaaaaap-1",  # 0.8333333
        )
    ],
    dtype=torch.float32,
)
FP4_MAGNITUDE_CODES = torch.tensor(
    [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=torch.int32
)
FP4_SIGN = 0b1000

_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def flush_subnormals(values: torch.Tensor) -> torch.Tensor:
    """``values`` with every fp32 subnormal replaced by 0, as the GPU's ``.FTZ`` instructions read and write them
    (the sign of a flushed zero never matters to the quantizer: ``-0 < 0`` is false)."""
    return torch.where(values.abs() < _SMALLEST_NORMAL, torch.zeros_like(values), values)


def cuda_4bit_index(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The int32 4-bit index bnb's CUDA tree gives each fp32 ``scaled`` value (already ``x * r`` and flushed)."""
    if quant_type == "nf4":
        return (NF4_THRESHOLDS.to(scaled.device) < scaled.unsqueeze(-1)).sum(-1, dtype=torch.int32)
    magnitude = (FP4_THRESHOLDS.to(scaled.device) < scaled.abs().unsqueeze(-1)).sum(-1)
    sign = torch.where(scaled < 0, FP4_SIGN, 0).to(torch.int32)
    return FP4_MAGNITUDE_CODES.to(scaled.device)[magnitude] | sign


def quantize_4bit_cuda(
    values: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed [ceil(numel / 2)] uint8, absmax [blocks] fp32)`` of fp32 ``values`` (any shape, read flattened) as
    bnb's CUDA ``quantize_4bit`` packs them (see the module docstring, also for the reciprocal), before any double
    quantization. Finite ``values`` only: bnb's max ignores a NaN, this one does not. Nothing is mutated."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_4bit_cuda: quant_type is {quant_type!r}; expected 'nf4' or 'fp4'")
    flat = values.reshape(-1).float()
    numel = flat.numel()
    blocks = -(-numel // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - numel))  # bnb's loads fill with 0
    x = flush_subnormals(padded).view(blocks, blocksize)
    absmax = x.abs().amax(dim=1)
    reciprocal = flush_subnormals(1.0 / absmax)  # inf for an all-zero block, as 1.0f / 0 on the GPU
    index = cuda_4bit_index(flush_subnormals(x * reciprocal.unsqueeze(1)), quant_type).view(-1)
    index = index[: numel + numel % 2].to(torch.uint8)  # the padding nibble of an odd count is kept
    return (index[0::2] << 4) | index[1::2], absmax
