"""PyTorch math of ``ops.lora_linear`` (numpy for the CPU's dropout mask): the oracle for the Triton kernels and
the CPU production path.

``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with W frozen. This module holds the math only; the contract checks, the
dispatch and the ``torch.autograd.Function`` (which saves x once, the small ``drop(x) Aᵀ`` product and the packed
dropout mask, and computes the weight and bias gradients) live in ``ops.lora_linear``:

- ``eager_lora_linear``: plain autograd, for the case it already handles best (no dropout, adapters in x's dtype);
- ``forward`` and ``backward``: what the autograd Function runs on this backend otherwise. The dropout mask is
  drawn once, in forward, and kept bit-packed (1 bit per element of x, 1/32 of an fp32 copy); backward unpacks
  it and draws nothing, so no dropped copy of the input is ever kept.

**The dropout mask** is the Triton kernels' (``kernels/_utils.py``, ``dropout_keep``), bit for bit, so that this
module stays their oracle. It is a counter-based hash (computed with numpy's uint32 ops on the CPU, with int64
torch ops on other devices): for element ``(i, j)`` of
x viewed as ``[M, in]``, ``h = lowbias32((i·in + j + seed · 0x9E3779B9) mod 2**32)`` (Chris Wellons' 32-bit
integer hash: two multiply-xorshift rounds), and the element is kept when ``h >> 8 >= round(p · 2**24)``. The
seed is an int64 ``[1]`` tensor on x's device, drawn with ``torch.randint`` per call (no ``.item()``, no
``torch.Generator``: torch.compile keeps it in the graph and a CUDA-graph replay draws a new one; only a CPU seed
is read on the host, inside the op). Flat indices
wrap at 2**32 elements (an ``[M, in]`` input of 4·10⁹ elements would repeat its mask); the drop rate is ``p``
rounded to a multiple of 2**-24. Why a hash and not Philox: it is ~12 elementwise integer ops (Philox's
ten rounds of 32×32→64-bit products are several times more), and in a kernel a dozen integer instructions per
element instead of Philox's ~64.

Packed layout (the kernels' ``pack_keep``): ``[M, ceil(in/8)]`` uint8; bit ``b`` (least significant first) of
byte ``j`` of row ``i`` keeps element ``(i, 8j + b)``; padding bits are 0.

Operands as ``ops.lora_linear`` documents and checks them (any float dtype torch computes in, float64 included).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lora_engine.reference import cpu_linear

SEED_MULTIPLIER = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive seeds over the 32-bit index space
_LOW_32_BITS = 0xFFFFFFFF
# Elements hashed per chunk: the temporaries (256 KiB each on the CPU) stay in a core's L2, so the dozen passes of
# the hash are compute-bound instead of a dozen trips to memory (measured 2-10x faster than unchunked).
_HASH_CHUNK = 1 << 15
_CPU_HASH_CHUNK = 1 << 16
_LOWBIAS32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def drop_threshold(p: float) -> int:
    """An element is dropped when its 24-bit hash is below this: ``p · 2**24``, rounded (the kernels' too)."""
    return round(p * 2**24)


def _lowbias32_(hashed: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32`` on int64 values in ``[0, 2**32)``, in place (products masked back to 32 bits)."""
    first, second = _LOWBIAS32_MULTIPLIERS
    hashed ^= hashed >> 16
    hashed *= first
    hashed &= _LOW_32_BITS
    hashed ^= hashed >> 15
    hashed *= second
    hashed &= _LOW_32_BITS
    hashed ^= hashed >> 16
    return hashed


def keep_mask(seed: torch.Tensor, n_rows: int, width: int, p: float) -> torch.Tensor:
    """The boolean keep-mask ``[n_rows, width]`` of inverted dropout with drop probability ``p`` over a row-major
    ``[n_rows, width]`` input, from ``seed`` (int64 ``[1]``, on the device the mask is made on): the module
    docstring's hash, the same bits the Triton kernels draw.

    On the CPU the hash runs in numpy's uint32 arithmetic (wrapping products, logical shifts: 10 ufunc calls per
    chunk, about 5x faster than torch's int64 ops, which also pay a dispatch per op); elsewhere in torch int64 ops
    on the device, with no host sync. Both give the same bits (tested).
    """
    if seed.device.type == "cpu":
        return _keep_mask_numpy(int(seed), n_rows, width, p)
    return _keep_mask_torch(seed, n_rows, width, p)


def _keep_mask_torch(seed: torch.Tensor, n_rows: int, width: int, p: float) -> torch.Tensor:
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


def _keep_mask_numpy(seed: int, n_rows: int, width: int, p: float) -> torch.Tensor:
    total = n_rows * width
    keep = np.empty(total, dtype=np.bool_)
    key = (seed * SEED_MULTIPLIER) & _LOW_32_BITS
    threshold = np.uint32(drop_threshold(p))
    first, second = (np.uint32(multiplier) for multiplier in _LOWBIAS32_MULTIPLIERS)
    offsets = np.arange(min(_CPU_HASH_CHUNK, total), dtype=np.uint32)
    hashed, shifted = np.empty_like(offsets), np.empty_like(offsets)
    for start in range(0, total, _CPU_HASH_CHUNK):
        length = min(_CPU_HASH_CHUNK, total - start)
        value, scratch = hashed[:length], shifted[:length]
        np.add(offsets[:length], np.uint32((start + key) & _LOW_32_BITS), out=value)  # wraps mod 2**32
        for shift, multiplier in ((16, first), (15, second), (16, None)):
            np.right_shift(value, shift, out=scratch)
            value ^= scratch
            if multiplier is not None:
                value *= multiplier  # uint32: wraps mod 2**32, as the hash wants
        value >>= 8
        np.greater_equal(value, threshold, out=keep[start : start + length])
    return torch.from_numpy(keep).view(n_rows, width)


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """``[M, width]`` booleans → ``[M, ceil(width / 8)]`` uint8 in the module docstring's layout (numpy's
    ``packbits`` on the CPU, torch ops elsewhere)."""
    if keep.device.type == "cpu":
        return torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))
    return _pack_keep_torch(keep)


def _pack_keep_torch(keep: torch.Tensor) -> torch.Tensor:
    n_rows, width = keep.shape
    padded = F.pad(keep, (0, -width % 8)) if width % 8 else keep
    groups = padded.view(n_rows, -1, 8).to(torch.uint8)
    packed = groups[..., 0].clone()
    for bit in range(1, 8):
        packed |= groups[..., bit] << bit
    return packed


def unpack_keep(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``pack_keep``'s inverse: ``[M, ceil(width / 8)]`` uint8 → ``[M, width]`` booleans (numpy's ``unpackbits``
    on the CPU, torch ops elsewhere)."""
    if bits.device.type == "cpu":
        unpacked = np.unpackbits(bits.numpy(), axis=1, count=width, bitorder="little")
        return torch.from_numpy(unpacked.view(np.bool_))
    return _unpack_keep_torch(bits, width)


def _unpack_keep_torch(bits: torch.Tensor, width: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.view(bits.shape[0], -1)[:, :width].bool()


def keep_bits(seed: torch.Tensor, n_rows: int, width: int, p: float) -> torch.Tensor:
    """The packed keep-mask (``[n_rows, ceil(width / 8)]`` uint8) the forward saves: ``pack_keep(keep_mask(...))``."""
    return pack_keep(keep_mask(seed, n_rows, width, p))


def eager_lora_linear(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out):
    """``x [..., in]`` → ``[..., out]`` without dropout, as plain differentiable torch ops.

    With adapters in the input's dtype, plain autograd already saves the input only once (no copy) and runs its
    backward in C++, which beats the Python ``forward``/``backward`` pair below. The low-rank term is added into
    the fresh base output by one ``addmm_`` with ``alpha = s`` (``_add_low_rank_``): no ``[..., out]`` product, no
    scaled copy in forward, and backward scales only ``[N, r]`` and ``[r, out]`` products.
    """
    in_features = x.shape[-1]
    x_rows = x.reshape(-1, in_features)
    x_lora_A = F.linear(x_rows, lora_A)  # [N, r]
    if weight is None:
        delta = F.linear(x_lora_A, lora_B) * scaling
        return delta.view(*x.shape[:-1], lora_B.shape[0])
    out = _add_low_rank_(base_output(x_rows, weight, bias, fan_in_fan_out), x_lora_A, lora_B, scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


#: At most this many rows, and a weight of at least this many elements (1 MiB in fp32; a smaller one sits in cache,
#: where packing it costs less than the extra transposes), a decoding base product runs as ``W @ xᵀ`` (``base_output``).
SKINNY_ROWS = 4
SKINNY_MIN_WEIGHT = 1 << 18


def base_output(x_rows, weight, bias, fan_in_fan_out):
    """``x_rows [N, in] Wᵀ + b`` → a fresh ``[N, out]`` tensor that no autograd node saves (callers add into it).

    Computed by ``cpu_linear.linear`` (oneDNN for fp32 on the CPU, else ``F.linear``), except when decoding 2 to
    ``SKINNY_ROWS`` rows (fp32 CPU rows without autograd, a weight of at least ``SKINNY_MIN_WEIGHT`` elements): then
    as ``(W @ x_rowsᵀ + b)ᵀ``. MKL streams W once for that product, while ``x Wᵀ`` packs a copy of W first.
    1024 × 1024, 4 rows, two threads, best of many: 0.11 ms (oneDNN 0.16 ms, ``F.linear`` 0.87 ms or more); from 5
    rows on it loses to oneDNN. One row goes to oneDNN: MKL's GEMV (``F.linear``, ``mv``, ``W @ xᵀ`` alike) runs on
    one thread, 0.21 ms with W coming from memory against oneDNN's 0.14 ms on two (idle machine, 1024 × 1024).
    Like every two-threaded product, these slow down when another process holds one of the cores.

    The same dot products summed in another order: within fp32 rounding of ``F.linear``. With autograd the extra
    transposes cost more in bookkeeping than they save.
    """
    rows = x_rows.shape[0]
    decoding = (
        x_rows.device.type == "cpu"
        and x_rows.dtype == torch.float32
        and not fan_in_fan_out
        and not torch.is_grad_enabled()
        and weight.numel() >= SKINNY_MIN_WEIGHT
    )
    if decoding and 1 < rows <= SKINNY_ROWS:
        product = (
            torch.mm(weight, x_rows.T) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x_rows.T)
        )
        return product.T.contiguous()
    return cpu_linear.linear(x_rows, weight.T if fan_in_fan_out else weight, bias)


def _add_low_rank_(out, x_lora_A, lora_B, scaling):
    """``out [N, out] + s · x_lora_A [N, r] lora_Bᵀ``, in place when it can be: one ``addmm_`` with ``alpha = s``
    (a float scaling, one dtype, no autocast); otherwise out of place, as ``out + (x_lora_A lora_Bᵀ) · s`` cast to
    out's dtype (a 0-d tensor scaling after ``prepare_model_for_compiled_hotswap``, adapters in another dtype)."""
    if (
        isinstance(scaling, float)
        and out.dtype == x_lora_A.dtype == lora_B.dtype
        and not torch.is_autocast_enabled(out.device.type)
    ):
        return out.addmm_(x_lora_A, lora_B.T, alpha=scaling)
    return (out + F.linear(x_lora_A, lora_B) * scaling).to(out.dtype)


def _as_factor(keep: torch.Tensor, shape) -> torch.Tensor:
    """The keep-mask as a 0/1 factor shaped ``shape``, viewed as uint8: ``x * factor`` then runs at a float
    multiply's speed (1024 × 512: 66 us, against ~4x more for a bool operand and 314 us for ``masked_fill``). torch
    casts the factor into an fp32 temporary the size of x on the way (``input_grad`` orders its work for it)."""
    return keep.view(torch.uint8).view(shape)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    """``(y [..., out], x_lora_A [..., r], keep_bits)``: the output, in the base output's dtype (the adapters'
    without a weight), the product ``drop(x) Aᵀ`` in the adapters' dtype and, when ``dropout_p > 0``, the keep-mask
    drawn from ``seed`` (int64 ``[1]`` on x's device), packed ``[M, ceil(in/8)]`` uint8, else None. ``backward``
    takes the last two back.

    Dropout zeroes the dropped elements of x and rescales the ``[..., r]`` product by ``1 / (1 - p)``, not x (the
    same value up to rounding, r/in of the multiplies). Transient memory: the boolean mask (1 byte per element of
    x) and the zeroed copy, both freed on return.
    """
    in_features = x.shape[-1]
    x_lora = x.to(lora_A.dtype)
    bits = None
    if dropout_p > 0.0:
        keep = keep_mask(seed, x.numel() // in_features if in_features else 0, in_features, dropout_p)
        bits = pack_keep(keep)
        x_lora_A = F.linear(x_lora * _as_factor(keep, x.shape), lora_A)  # [..., r]
        x_lora_A *= 1.0 / (1.0 - dropout_p)
        del keep
    else:
        x_lora_A = F.linear(x_lora, lora_A)  # [..., r]
    if weight is None:
        return F.linear(x_lora_A, lora_B) * scaling, x_lora_A, bits
    out = base_output(x.reshape(-1, in_features), weight, bias, fan_in_fan_out)
    out = _add_low_rank_(out, x_lora_A.reshape(-1, x_lora_A.shape[-1]), lora_B, scaling)
    return out.view(*x.shape[:-1], out.shape[-1]), x_lora_A, bits


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

    # The low-rank path runs in the adapter dtype, as in forward; s multiplies the [N, r] and [out, r] products,
    # never the [N, out] gradient.
    grad_lora = grad_flat.to(lora_B.dtype)  # [N, out]
    grad_x_lora_A = grad_lora @ lora_B  # [N, r]
    grad_x_lora_A *= scaling
    # The saved mask is unpacked once and serves both dA and dx; nothing random is drawn here. The 1 / (1 - p)
    # rescale goes on the [N, r] side.
    keep = None
    if keep_bits is not None:
        keep = _as_factor(unpack_keep(keep_bits, in_features), (-1, in_features))
        grad_x_lora_A *= 1.0 / (1.0 - dropout_p)
    if need_B:
        grad_B = grad_lora.T @ x_lora_A.reshape(-1, rank).to(lora_B.dtype)
        grad_B *= scaling
    if need_A:
        x_lora = x.reshape(-1, in_features).to(lora_A.dtype)
        grad_A = grad_x_lora_A.T @ (x_lora if keep is None else x_lora * keep)
    if need_x:
        base_weight = None if weight is None else weight.T if fan_in_fan_out else weight
        grad_x = input_grad(grad_flat, base_weight, grad_x_lora_A, lora_A, keep)
        grad_x = grad_x.reshape(x.shape).to(x.dtype)
    return grad_x, grad_A, grad_B


def input_grad(grad_rows, weight, grad_x_lora_A, lora_A, keep):
    """``dx = dy W + (dxa A) · keep`` → ``[N, in]``: ``grad_rows [N, out]`` times the base ``weight [out, in]``
    (None: no base term) on ``cpu_linear`` (oneDNN for fp32 on the CPU), plus ``grad_x_lora_A [N, r] lora_A``
    (the adapters' dtype) times ``keep`` (the ``[N, in]`` uint8 0/1 factor, or None); in the weight's dtype,
    each low-rank term rounded once into it.

    One ``[N, in]`` tensor is held at a time beside the result. Without a mask the low-rank term is added into the
    base term inside one ``addmm_``. With one it is formed and masked first: multiplying by the uint8 factor makes
    an fp32 copy of it (the size of dx), which then never sits beside the base term too (4.7 MiB of peak for a
    1024 × 512 layer against 6.4 MiB the other way round).
    """
    low_rank = None
    if keep is not None or weight is None:
        low_rank = grad_x_lora_A @ lora_A
        if keep is not None:
            low_rank *= keep
    if weight is None:
        return low_rank
    grad_x = cpu_linear.linear(grad_rows.to(weight.dtype), weight.T, None)  # dy W
    if low_rank is not None:
        return grad_x.add_(low_rank)
    if grad_x.dtype == grad_x_lora_A.dtype == lora_A.dtype:
        return grad_x.addmm_(grad_x_lora_A, lora_A)
    return grad_x.add_(grad_x_lora_A @ lora_A)
