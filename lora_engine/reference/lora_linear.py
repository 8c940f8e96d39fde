"""Pure-PyTorch math of ``ops.lora_linear``: the oracle for the Triton kernels and the CPU production path.

``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with W frozen. This module holds the math only; the contract checks, the
dispatch and the ``torch.autograd.Function`` (which saves x once, the small ``drop(x) Aᵀ`` product and the packed
dropout mask, and computes the weight and bias gradients) live in ``ops.lora_linear``:

- ``eager_lora_linear``: plain autograd, for the case it already handles best (no dropout, adapters in x's dtype);
- ``forward`` and ``backward``: what the autograd Function runs on this backend otherwise. The dropout mask is
  drawn once, in forward, and kept bit-packed (1 bit per element of x, 1/32 of an fp32 copy); backward unpacks
  it and draws nothing, so no dropped copy of the input is ever kept.

**The dropout mask** is the Triton kernels' (``kernels/_utils.py``, ``dropout_keep``), bit for bit, so that this
module stays their oracle. It is a counter-based hash, computed here with int64 torch ops: for element ``(i, j)`` of
x viewed as ``[M, in]``, ``h = lowbias32((i·in + j + seed · 0x9E3779B9) mod 2**32)`` (Chris Wellons' 32-bit
integer hash: two multiply-xorshift rounds), and the element is kept when ``h >> 8 >= round(p · 2**24)``. The
seed is an int64 ``[1]`` tensor on x's device, drawn with ``torch.randint`` per call (no ``.item()``, no
``torch.Generator``: torch.compile keeps it in the graph and a CUDA-graph replay draws a new one). Flat indices
wrap at 2**32 elements (an ``[M, in]`` input of 4·10⁹ elements would repeat its mask); the drop rate is ``p``
rounded to a multiple of 2**-24. Why a hash and not Philox: it is ~12 elementwise int64 ops in torch (Philox's
ten rounds of 32×32→64-bit products are several times more), and in a kernel a dozen integer instructions per
element instead of Philox's ~64.

Packed layout (the kernels' ``pack_keep``): ``[M, ceil(in/8)]`` uint8; bit ``b`` (least significant first) of
byte ``j`` of row ``i`` keeps element ``(i, 8j + b)``; padding bits are 0.

Operands as ``ops.lora_linear`` documents and checks them (any float dtype torch computes in, float64 included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEED_MULTIPLIER = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive seeds over the 32-bit index space
_LOW_32_BITS = 0xFFFFFFFF
# Elements hashed per chunk: the int64 temporaries (256 KiB) stay in a core's L2, so the dozen passes of the
# hash are compute-bound instead of twelve trips to memory (measured 2-10x faster than unchunked on this CPU).
_HASH_CHUNK = 1 << 15
_BIT_WEIGHTS = tuple(1 << bit for bit in range(8))


def drop_threshold(p: float) -> int:
    """An element is dropped when its 24-bit hash is below this: ``p · 2**24``, rounded (the kernels' too)."""
    return round(p * 2**24)


def _lowbias32_(hashed: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32`` on int64 values in ``[0, 2**32)``, in place (products masked back to 32 bits)."""
    hashed ^= hashed >> 16
    hashed *= 0x7FEB352D
    hashed &= _LOW_32_BITS
    hashed ^= hashed >> 15
    hashed *= 0x846CA68B
    hashed &= _LOW_32_BITS
    hashed ^= hashed >> 16
    return hashed


def keep_mask(seed: torch.Tensor, n_rows: int, width: int, p: float) -> torch.Tensor:
    """The boolean keep-mask ``[n_rows, width]`` of inverted dropout with drop probability ``p`` over a row-major
    ``[n_rows, width]`` input, from ``seed`` (int64 ``[1]``, on the device the mask is made on): the module
    docstring's hash, the same bits the Triton kernels draw."""
    keep = torch.empty(n_rows, width, dtype=torch.bool, device=seed.device)
    key = (seed * SEED_MULTIPLIER) & _LOW_32_BITS
    threshold = drop_threshold(p)
    flat_keep = keep.view(-1)
    for start in range(0, flat_keep.numel(), _HASH_CHUNK):
        end = min(start + _HASH_CHUNK, flat_keep.numel())
        hashed = torch.arange(start, end, dtype=torch.int64, device=seed.device)
        hashed += key
        hashed &= _LOW_32_BITS
        torch.ge(_lowbias32_(hashed) >> 8, threshold, out=flat_keep[start:end])
    return keep


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """``[M, width]`` booleans → ``[M, ceil(width / 8)]`` uint8 in the module docstring's layout."""
    n_rows, width = keep.shape
    padded = F.pad(keep, (0, -width % 8)) if width % 8 else keep
    groups = padded.view(n_rows, -1, 8).to(torch.uint8)
    packed = groups[..., 0].clone()
    for bit in range(1, 8):
        packed |= groups[..., bit] << bit
    return packed


def unpack_keep(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``pack_keep``'s inverse: ``[M, ceil(width / 8)]`` uint8 → ``[M, width]`` booleans."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.view(bits.shape[0], -1)[:, :width].bool()


def keep_bits(seed: torch.Tensor, n_rows: int, width: int, p: float) -> torch.Tensor:
    """The packed keep-mask (``[n_rows, ceil(width / 8)]`` uint8) the forward saves: ``pack_keep(keep_mask(...))``."""
    return pack_keep(keep_mask(seed, n_rows, width, p))


def _keep_multiplier(keep: torch.Tensor, shape: torch.Size, dtype: torch.dtype, p: float) -> torch.Tensor:
    """Inverted dropout's per-element multiplier (0, or ``1 / (1 - p)``) in ``dtype``, shaped as x."""
    return (keep.to(dtype) * (1.0 / (1.0 - p))).view(shape)


def _dropped(x: torch.Tensor, multiplier: torch.Tensor | None) -> torch.Tensor:
    return x if multiplier is None else x * multiplier


def eager_lora_linear(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out):
    """``x [..., in]`` → ``[..., out]`` without dropout, as plain differentiable torch ops.

    With adapters in the input's dtype, plain autograd already saves the input only once (no copy) and runs its
    backward in C++, which beats the Python ``forward``/``backward`` pair below.
    """
    delta = F.linear(F.linear(x, lora_A), lora_B) * scaling
    if weight is None:
        return delta
    base_out = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    return base_out + delta


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``(y [..., out], x_lora_A [..., r], keep_bits)``: the output, in the base output's dtype (the adapters'
    without a weight), the product ``drop(x) Aᵀ`` in the adapters' dtype and, when ``dropout_p > 0``, the keep-mask
    drawn from ``seed`` (int64 ``[1]`` on x's device), packed ``[M, ceil(in/8)]`` uint8, else None. ``backward``
    takes the last two back."""
    in_features = x.shape[-1]
    multiplier = bits = None
    if dropout_p > 0.0:
        keep = keep_mask(seed, x.numel() // in_features if in_features else 0, in_features, dropout_p)
        bits = pack_keep(keep)
        multiplier = _keep_multiplier(keep, x.shape, lora_A.dtype, dropout_p)
    x_lora = _dropped(x.to(lora_A.dtype), multiplier)
    x_lora_A = F.linear(x_lora, lora_A)  # [..., r]
    delta = F.linear(x_lora_A, lora_B) * scaling
    if weight is None:
        return delta, x_lora_A, bits
    base_weight = weight.T if fan_in_fan_out else weight
    base_out = F.linear(x, base_weight, bias)
    return (base_out + delta).to(base_out.dtype), x_lora_A, bits


def backward(
    grad_out, x, weight, lora_A, lora_B, x_lora_A, keep_bits, scaling, dropout_p, fan_in_fan_out, needs
):
    """``(dx, dA, dB)`` for ``dy = grad_out [..., out]``, each None unless ``needs`` (three bools) asks for it.

    ``dx`` includes the base term ``dy W``; ``dx`` is in x's dtype, ``dA``/``dB`` in the adapters'. The weight and
    bias gradients are not computed here: ``ops.lora_linear`` computes them the same way for every backend.
    """
    need_x, need_A, need_B = needs
    in_features, rank = x.shape[-1], lora_A.shape[0]
    grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_A = grad_B = None

    # The low-rank path runs in the adapter dtype, as in forward.
    grad_delta = grad_flat.to(lora_B.dtype) * scaling  # [N, out]
    grad_x_lora_A = grad_delta @ lora_B  # [N, r]
    # The saved mask is unpacked once and serves both dA and dx; nothing random is drawn here.
    multiplier = None
    if keep_bits is not None:
        multiplier = _keep_multiplier(unpack_keep(keep_bits, in_features), x.shape, lora_A.dtype, dropout_p)
    if need_B:
        grad_B = grad_delta.T @ x_lora_A.reshape(-1, rank).to(lora_B.dtype)
    if need_A:
        x_lora = _dropped(x.to(lora_A.dtype), multiplier).reshape(-1, in_features)
        grad_A = grad_x_lora_A.T.to(lora_A.dtype) @ x_lora
    if need_x:
        grad_x = _dropped((grad_x_lora_A.to(lora_A.dtype) @ lora_A).reshape(x.shape), multiplier)
        if weight is not None:
            base_weight = weight.T if fan_in_fan_out else weight
            grad_x = grad_x + (grad_flat.to(weight.dtype) @ base_weight).reshape(x.shape)
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_A, grad_B
