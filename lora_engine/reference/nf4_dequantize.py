"""Pure-PyTorch decode of bitsandbytes' 4-bit (NF4/FP4) weights: the oracle for a Triton kernel and the CPU path.

The format, as ``bitsandbytes.functional.quantize_4bit`` writes it:

- The weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements; blocks run across
  row boundaries, and the last block may be partial. Block ``i`` has one fp32 scale, ``absmax[i]``.
- Each element is a 4-bit index into a 16-entry code table; two indices per byte, the **high** nibble first.
  An odd element count leaves the low nibble of the last byte as padding. The bytes may be stored in another
  ``quant_storage`` dtype; only their bits matter.
- Element ``j`` decodes to ``code[index_j] * absmax[j // blocksize]``, multiplied in fp32, then rounded
  (nearest-even) to the weight's dtype.
- With double quantization (``quant_state.nested``), ``absmax`` is itself stored as uint8 indices into
  ``state2.code`` (bnb's 8-bit dynamic map) with one fp32 scale per ``state2.blocksize`` entries, and the mean
  ``offset`` that was subtracted before quantizing it: ``absmax = code2[q] * absmax2[i // blocksize2]``
  (fp32, cast to ``state2.dtype``), then ``+= offset``, then fp32.

Every product and sum is taken in the same order and dtype as bitsandbytes' own decode, so the result is
bit-exact with ``bitsandbytes.functional.dequantize_4bit``.
"""

from __future__ import annotations

from math import gcd, prod

import torch

# NF4: the 16 quantiles of N(0, 1) from QLoRA (arXiv:2305.14314), normalised to [-1, 1], in index order.
_NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4: 1 sign bit (the index's top bit), 2 exponent bits, 1 mantissa bit, in index order; divided in fp32 by the
# largest magnitude, 12, exactly as bitsandbytes normalises it (so 1/6, 1/3, 2/3 and 1/192 round the same way).
# Index 8 is +0.0, as in bnb's table (``get_4bit_type("fp4")``, its pure-PyTorch and AVX-512 decodes); bnb's CUDA
# kernel and scalar C++ loop give -0.0 there, equal in value.
_FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / torch.tensor(12.0, dtype=torch.float32)

CODE_TABLES = {"nf4": _NF4_CODE, "fp4": _FP4_CODE}


def _byte_pairs(code: torch.Tensor) -> torch.Tensor:
    """``[256, 2]``: row ``b`` is ``(code[b >> 4], code[b & 15])``, the two values of packed byte ``b``."""
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=-1)


_BYTE_PAIRS = {quant_type: _byte_pairs(code) for quant_type, code in CODE_TABLES.items()}


def _scaled_by_block(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 ``values[j] * absmax[j // blocksize]`` over a flat ``values``; the last block may be partial."""
    numel = values.numel()
    blocks = -(-numel // blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - numel))
    scaled = padded.view(blocks, blocksize) * absmax[:blocks].view(blocks, 1)
    return scaled.view(-1)[:numel]


def block_absmax(quant_state) -> torch.Tensor:
    """The per-block fp32 scales of a 4-bit ``QuantState``, decoding the nested 8-bit absmax if there is one."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    absmax_codes = state2.code.float()[quant_state.absmax.reshape(-1).long()]
    absmax = _scaled_by_block(absmax_codes, state2.absmax.float(), state2.blocksize).to(state2.dtype)
    # In place, as bitsandbytes does, so the sum is rounded to state2.dtype before the cast to fp32.
    absmax += quant_state.offset
    return absmax.float()


def nf4_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """``ops.nf4_dequantize`` in PyTorch; see its docstring for the contract.

    For NF4 on the CPU the per-element products of the whole blocks are taken by bitsandbytes' compiled CPU decode
    (about 10x faster than a PyTorch gather there), fed with this module's absmax and asked for fp32, and those of
    a partial last block, if any, by a PyTorch lookup; elsewhere everything by ``nf4_dequantize_torch``. The two
    are bit-exact. bnb 0.50's AVX-512 kernel indexes absmax per row (``row * (cols // blocksize) + col //
    blocksize``), the element's flat block only where rows hold whole blocks, and bnb itself calls it on any
    even width, misplacing the scales of blocks that cross rows: here it is asked for rows of whole blocks
    (``_whole_block_rows``), which is the same flat weight. FP4 stays on ``nf4_dequantize_torch``: bnb's scalar
    CPU loop (CPUs without AVX-512) gives its zero code the other sign, which a zero or negative absmax (an
    all-zero block under double quant) carries through.
    """
    shape = tuple(quant_state.shape)
    numel, blocksize = prod(shape), quant_state.blocksize
    whole = numel - numel % blocksize
    if packed.device.type != "cpu" or quant_state.quant_type != "nf4" or whole == 0:
        return nf4_dequantize_torch(packed, quant_state)
    packed_bytes = packed.reshape(-1).view(torch.uint8)
    absmax = _compiled_block_absmax(quant_state)
    # fp32 out, cast here: its bf16 output flushes subnormals (VCVTNEPS2BF16), torch's cast rounds to nearest-even
    # and keeps them.
    values = torch.ops.bitsandbytes.dequantize_4bit.default(
        packed_bytes[: whole // 2], absmax[: whole // blocksize], blocksize, "nf4",
        _whole_block_rows(shape, whole, blocksize), torch.float32,
    ).view(-1)  # fmt: skip
    if (
        whole < numel
    ):  # the partial last block: its bytes through the pair table, as nf4_dequantize_torch does
        tail_bytes = packed_bytes[whole // 2 : (numel + 1) // 2]
        tail = _BYTE_PAIRS["nf4"].index_select(0, tail_bytes.int()).view(-1)[: numel - whole]
        values = torch.cat([values, tail.mul_(absmax[whole // blocksize])])
    return values.view(shape).to(quant_state.dtype)


def _whole_block_rows(shape: tuple[int, ...], whole: int, blocksize: int) -> tuple[int, int]:
    """``[rows, cols]`` for the first ``whole`` elements (whole blocks) in which every row holds whole blocks: the
    weight's own when its rows do, else rows of up to 16 blocks (any width does; 16 keeps rows long enough for the
    kernel's vector loop)."""
    if shape[-1] % blocksize == 0 and whole == prod(shape):
        return (whole // shape[-1], shape[-1])
    cols = blocksize * gcd(whole // blocksize, 16)
    return (whole // cols, cols)


def _compiled_block_absmax(quant_state) -> torch.Tensor:
    """``block_absmax`` with the nested 8-bit absmax decoded by bitsandbytes' compiled CPU loop (the one its own
    ``dequantize_4bit`` calls: the same fp32 product per entry, so the same bits; half the time of the gather
    and products in torch ops)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
        quant_state.absmax, state2.absmax, state2.code, state2.blocksize, state2.dtype
    )
    absmax += quant_state.offset
    return absmax.float()


def nf4_dequantize_torch(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """``ops.nf4_dequantize`` in plain PyTorch ops, on any device and any width: the oracle of the fast path."""
    shape = tuple(quant_state.shape)
    numel = prod(shape)
    blocksize = quant_state.blocksize
    code = CODE_TABLES[quant_state.quant_type].to(packed.device)
    # One gather per packed byte, not two per element: byte b decodes to (code[b >> 4], code[b & 15]), so a
    # 256-row table of pairs turns the bytes straight into the flat weight (high nibble first). The values and
    # the fp32 products are the same as a per-nibble lookup's, so the result stays bit-exact with bnb.
    packed_bytes = packed.reshape(-1).view(torch.uint8)[: (numel + 1) // 2]
    values = _byte_pairs(code).index_select(0, packed_bytes.int()).view(-1)[:numel]
    absmax = block_absmax(quant_state)
    # Scaled in place, whole blocks as one [blocks, blocksize] product, then the partial last block if any.
    whole_blocks, tail = divmod(numel, blocksize)
    values[: whole_blocks * blocksize].view(whole_blocks, blocksize).mul_(absmax[:whole_blocks].view(-1, 1))
    if tail:
        values[whole_blocks * blocksize :].mul_(absmax[whole_blocks])
    return values.view(shape).to(quant_state.dtype)
