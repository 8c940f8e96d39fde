"""Combining several LoRA adapters into one: the math behind ``add_weighted_adapter``.

Plain tensor functions, no modules: ``weighted.add_weighted_adapter`` loops over layers and calls them per
layer.

- **Task-arithmetic helpers** under peft's names and semantics (``peft.utils.merge_utils``): pruning
  (``prune``, ``magnitude_based_pruning``, ``random_pruning``), sign election (``calculate_majority_sign_mask``,
  ``disjoint_merge``) and the five merges of a stack of same-shaped "task tensors" (``task_arithmetic``,
  ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``). The random ones draw from torch's global RNG
  with the same calls in the same order as peft, so one ``torch.manual_seed`` gives identical results.
- **Per-layer combination**: ``combine_factors`` mixes the factors ``A_i [r_i, in]``, ``B_i [out, r_i]``
  directly (``cat``, ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``);
  ``combine_deltas_svd`` mixes the full deltas ``ΔW_i = s_i B_i A_i [out, in]`` and factors the result again
  by truncated SVD (``svd`` and the ``*_svd`` types). ``new_rank`` and ``resolve_combination_type`` hold
  peft's rules for the new adapter's rank and type.

The new adapter's scaling is taken to be exactly 1: ``add_weighted_adapter`` writes ``lora_alpha = r`` and
``use_rslora=False`` into its config, so ``B A`` of what these functions return is the whole delta. (peft keeps
``use_rslora`` from the first source, which makes its scaling ``√r`` instead of 1: huggingface/peft#3761.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch

#: Types that mix the factors A and B directly; all but ``cat`` need sources of one rank.
FACTOR_COMBINATION_TYPES = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Types that mix the full deltas, then factor the result by truncated SVD.
SVD_COMBINATION_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")

MajoritySignMethod = Literal["total", "frequency"]


# ---------------------------------------------------------------------------------------------------- pruning
def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest ``|value|``, zero the rest.

    Any shape and floating dtype; returns a new tensor of the same shape and dtype. Among equal magnitudes at
    the threshold, ``torch.topk`` decides which are kept (as in peft).
    """
    keep = int(density * tensor.numel())
    flat_mask = torch.zeros_like(tensor).reshape(-1)
    flat_mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * flat_mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE), zero the rest.

    With ``rescale`` the kept entries are divided by ``density`` so that the expectation is ``tensor``
    (``density == 0`` then gives NaN, as in peft). Draws one ``torch.bernoulli`` over a tensor shaped, typed and
    strided like ``tensor`` from the global RNG, exactly as peft does.
    """
    keep_mask = torch.bernoulli(torch.full_like(tensor, fill_value=density))
    pruned = tensor * keep_mask
    if rescale:
        pruned = pruned / density
    return pruned


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
) -> torch.Tensor:
    """Prune ``tensor`` to a fraction ``density`` of its entries by ``method``.

    ``density >= 1`` warns and returns ``tensor`` itself, unpruned (and, for ``random``, draws nothing from the
    RNG). Raises ``ValueError`` for ``density < 0`` or an unknown ``method``. ``rescale`` is used by ``random``
    only.
    """
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method!r}: expected 'magnitude' or 'random'")


# ------------------------------------------------------------------------------------------ sign election (TIES)
def calculate_majority_sign_mask(tensor: torch.Tensor, method: MajoritySignMethod = "total") -> torch.Tensor:
    """Where each task tensor agrees with the elected sign; task tensors are stacked on dim 0.

    ``tensor``: ``[n, ...]``. The elected sign per entry is that of ``Σ_i tensor[i]`` (``"total"``) or of
    ``Σ_i sign(tensor[i])`` (``"frequency"``), with a tie (sum 0) going to ``+1``. Returns a bool ``[n, ...]``;
    zero entries never agree. Raises ``RuntimeError`` (peft's type) for another ``method``.
    """
    sign = tensor.sign()
    if method == "total":
        sign_magnitude = tensor.sum(dim=0)
    elif method == "frequency":
        sign_magnitude = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}": expected "total" or "frequency"')
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority_sign


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign: ``Σ_i t_i·m_i / max(Σ_i m_i, 1)``.

    ``task_tensors``: ``[n, ...]``; ``majority_sign_mask``: bool ``[n, ...]``. Entries where no task agrees are 0.
    The count is divided as a default-dtype float (fp32), so half-precision inputs come back promoted, as in peft.
    """
    agreeing_sum = (task_tensors * majority_sign_mask).sum(dim=0)
    agreeing_count = majority_sign_mask.sum(dim=0)
    return agreeing_sum / torch.clamp(agreeing_count, min=1.0)


# ------------------------------------------------------------------------------------------ task-tensor merges
# Every merge takes n same-shaped task tensors and a 1-D weights tensor of length n, and returns one tensor of
# that shape. Weights multiply as a tensor, so the result's dtype is promote(task dtype, weights dtype): fp32
# for half-precision tasks and fp32 weights, as in peft.


def _weight(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked [n, ...] * weights [n]``, the weights broadcast over the trailing dims."""
    return stacked * weights.reshape(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _prune_all(task_tensors: Sequence[torch.Tensor], density: float, random: bool) -> torch.Tensor:
    """Prune each task tensor in order (the RNG order of peft), then stack them on dim 0."""
    if random:
        pruned = [prune(tensor, density, method="random", rescale=True) for tensor in task_tensors]
    else:
        pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return torch.stack(pruned, dim=0)


def _elect_and_merge(
    stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: MajoritySignMethod
) -> torch.Tensor:
    # The sign is elected on the unweighted (pruned) tensors; the weights only enter the disjoint mean.
    majority_sign_mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(_weight(stacked, weights), majority_sign_mask)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i t_i``."""
    return _weight(torch.stack(list(task_tensors), dim=0), weights).sum(dim=0)


def magnitude_prune(
    task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float
) -> torch.Tensor:
    """``Σ_i w_i · magnitude_prune(t_i, density)``."""
    return _weight(_prune_all(task_tensors, density, random=False), weights).sum(dim=0)


def ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: MajoritySignMethod = "total",
) -> torch.Tensor:
    """TIES: magnitude-prune each ``t_i``, elect a sign per entry, then the disjoint mean of the ``w_i t_i``."""
    return _elect_and_merge(_prune_all(task_tensors, density, random=False), weights, majority_sign_method)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: ``Σ_i w_i · random_prune(t_i, density) / density``; draws from the RNG for t_1, t_2, … in order."""
    return _weight(_prune_all(task_tensors, density, random=True), weights).sum(dim=0)


def dare_ties(
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: MajoritySignMethod = "total",
) -> torch.Tensor:
    """DARE pruning (random, rescaled by ``1/density``), then the TIES sign election and disjoint mean."""
    return _elect_and_merge(_prune_all(task_tensors, density, random=True), weights, majority_sign_method)


def _merge_task_tensors(
    merge_type: str,
    task_tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: MajoritySignMethod,
    combination_type: str,
) -> torch.Tensor:
    """Dispatch ``merge_type`` (a factor-space type, already validated; ``linear`` is task arithmetic)."""
    if merge_type == "linear":
        return task_arithmetic(task_tensors, weights)
    if density is None:
        raise ValueError(
            f"combination_type {combination_type!r} prunes, so it needs a density in [0, 1]; got None"
        )
    if merge_type in ("ties", "dare_ties"):
        merge = ties if merge_type == "ties" else dare_ties
        return merge(task_tensors, weights, density, majority_sign_method)
    merge = dare_linear if merge_type == "dare_linear" else magnitude_prune
    return merge(task_tensors, weights, density)


# ------------------------------------------------------------------------------------------ rank and type rules
def _check_combination_type(combination_type: str) -> None:
    if combination_type not in FACTOR_COMBINATION_TYPES + SVD_COMBINATION_TYPES:
        raise ValueError(
            f"Invalid combination_type: {combination_type!r}; expected one of "
            f"{list(FACTOR_COMBINATION_TYPES + SVD_COMBINATION_TYPES)}"
        )


def resolve_combination_type(combination_type: str, num_adapters: int) -> str:
    """The type peft actually uses: ``"linear"`` for a single source adapter, else ``combination_type``.

    Raises ``ValueError`` for an unknown ``combination_type`` (even with one adapter).
    """
    _check_combination_type(combination_type)
    return "linear" if num_adapters == 1 else combination_type


def new_rank(ranks: Sequence[int], combination_type: str, svd_rank: int | None = None) -> int:
    """Rank of the combined adapter, from the sources' ranks (peft uses each config's ``max(r, *rank_pattern)``).

    - ``cat``: ``Σ r_i``;
    - the SVD types: ``svd_rank`` if given (truthy), else ``max(r_i)``;
    - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the common rank; sources of
      different ranks raise ``ValueError`` naming them.

    Apply ``resolve_combination_type`` first: with one source adapter peft always uses ``linear``.
    """
    _check_combination_type(combination_type)
    ranks = list(ranks)
    if not ranks:
        raise ValueError("new_rank needs the rank of at least one source adapter, got none")
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_COMBINATION_TYPES:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(
            "All adapters must have the same r value when using combination_type linear, ties, dare_ties, "
            f"dare_linear or magnitude_prune; got r values {ranks} for {combination_type!r}. "
            "Use 'cat' or an svd combination type to combine adapters of different ranks."
        )
    return ranks[0]


# ------------------------------------------------------------------------------------------ per-layer combination
def _check_same_length(**sequences: Sequence) -> int:
    lengths = {name: len(values) for name, values in sequences.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"need one entry per source adapter, at least one, in each of {lengths}")
    return next(iter(lengths.values()))


def combine_factors(
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    combination_type: str,
    density: float | None = None,
    majority_sign_method: MajoritySignMethod = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine one layer's source factors directly into ``(new_A, new_B)`` (factor-space types).

    Inputs, one entry per source adapter present in this layer: ``lora_As[i]`` ``[r_i, in]``, ``lora_Bs[i]``
    ``[out, r_i]``, its scaling ``s_i`` and its weight ``w_i``. ``ΔW_i = s_i B_i A_i``.

    - ``cat``: ``new_A = concat_rows(w_i s_i A_i)`` ``[Σ r_i, in]``, ``new_B = concat_cols(B_i)`` ``[out, Σ r_i]``,
      so ``new_B new_A = Σ_i w_i ΔW_i`` exactly. Dtypes are the inputs'. (When a layer lacks some sources,
      peft pads the rest of the adapter's rank with zero rows / columns; that is the caller's.)
    - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: all ``r_i`` equal to ``r``;
      the matching merge (``task_arithmetic`` for ``linear``) runs on the stacked A's with weights
      ``sgn(w_i s_i)·√|w_i s_i|``, then on the stacked B's with weights ``√|w_i s_i|``. For ``linear`` that is
      ``new_A = Σ ±√|w_i s_i| A_i``, ``new_B = Σ √|w_i s_i| B_i``, whose product has cross terms ``B_i A_j``:
      an approximation of ``Σ w_i ΔW_i``, not equal to it. Both results are cast to ``lora_As[0].dtype``;
      shapes ``[r, in]`` and ``[out, r]``. The dare types draw for the A's first, then the B's.

    ``density`` (required by the pruning types) and ``majority_sign_method`` are as in ``ties`` / ``dare_ties``.
    The result is meant for an adapter of scaling 1 (see the module docstring). Raises ``ValueError`` for
    mismatched lengths, unequal ranks outside ``cat``, a missing density or a type that is not factor-space.
    """
    _check_same_length(lora_As=lora_As, lora_Bs=lora_Bs, scalings=scalings, weights=weights)
    if combination_type not in FACTOR_COMBINATION_TYPES:
        raise ValueError(
            f"combine_factors handles combination_type in {list(FACTOR_COMBINATION_TYPES)}, got "
            f"{combination_type!r}; the svd types go through combine_deltas_svd"
        )
    if combination_type == "cat":
        # Left to right, as peft multiplies, so that the rounding is the same.
        new_A = torch.cat(
            [lora_A * weight * scaling for lora_A, weight, scaling in zip(lora_As, weights, scalings)]
        )
        return new_A, torch.cat(list(lora_Bs), dim=1)

    ranks = [lora_A.shape[0] for lora_A in lora_As]
    if len(set(ranks)) != 1:
        raise ValueError(
            f"combination_type {combination_type!r} needs factors of one rank in each layer, got ranks {ranks}"
        )
    weights_A, weights_B = [], []
    for weight, scaling in zip(weights, scalings):
        weight_with_scaling = weight * scaling
        root = math.sqrt(abs(weight_with_scaling))
        # The sign goes on A only: on both factors it would cancel in B A.
        weights_A.append(root if weight_with_scaling >= 0 else -root)
        weights_B.append(root)
    device = lora_As[0].device
    new_A = _merge_task_tensors(
        combination_type,
        lora_As,
        torch.tensor(weights_A, device=device),
        density,
        majority_sign_method,
        combination_type,
    )
    new_B = _merge_task_tensors(
        combination_type,
        lora_Bs,
        torch.tensor(weights_B, device=device),
        density,
        majority_sign_method,
        combination_type,
    )
    dtype = lora_As[0].dtype
    return new_A.to(dtype), new_B.to(dtype)


def combine_deltas_svd(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    combination_type: str,
    new_rank: int,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: MajoritySignMethod = "total",
    *,
    fan_in_fan_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine one layer's full deltas, then factor the result at rank ``new_rank`` (SVD types).

    ``deltas[i]`` is ``ΔW_i = s_i B_i A_i`` ``[out, in]`` (computed as ``(B_i @ A_i) * s_i``, as peft does),
    one per source adapter present in this layer, with weight ``w_i``. Steps:

    1. ``ΔW = merge(ΔW_1, …, ΔW_n; w)`` where merge is ``task_arithmetic`` (``svd``: ``ΔW = Σ w_i ΔW_i``),
       ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune`` for the ``*_svd`` types. The weights are
       an fp32 tensor, so ``ΔW`` (and the result) is fp32 for half-precision deltas.
    2. ``U, S, Vh = torch.linalg.svd(ΔW, full_matrices=svd_full_matrices, driver=svd_driver)``; with
       ``k = new_rank``: ``new_B = U[:, :k] diag(S[:k])`` ``[out, k]`` and ``new_A = Vh[:k]`` ``[k, in]``, so
       ``new_B new_A`` is the best rank-k approximation of ``ΔW``.
    3. With ``svd_clamp = q``: ``hi = quantile(concat(new_B, new_A), q)``; both are clamped to ``[-hi, hi]``.

    If ``ΔW`` has fewer than ``k`` singular values (``k > min(out, in)``), the missing rows of ``new_A`` and
    columns of ``new_B`` are zero, so the shapes stay ``[k, in]`` / ``[out, k]`` (peft returns factors of
    mismatched or short rank there). ``fan_in_fan_out``: the deltas are given ``[in, out]``, the layout of the
    base weight of transformers' ``Conv1D`` and of ``nn.Embedding``; step 1 runs in that layout, as in peft, so
    the dare types drop the same entries for the same seed, and ``ΔW`` is transposed before step 2.

    The result is meant for an adapter of scaling 1 (see the module docstring). Raises ``ValueError`` for an
    empty or mismatched input, a non-SVD type, ``new_rank < 1`` or a missing density.
    """
    _check_same_length(deltas=deltas, weights=weights)
    if combination_type not in SVD_COMBINATION_TYPES:
        raise ValueError(
            f"combine_deltas_svd handles combination_type in {list(SVD_COMBINATION_TYPES)}, got "
            f"{combination_type!r}; the factor-space types go through combine_factors"
        )
    if new_rank < 1:
        raise ValueError(f"new_rank must be a positive integer, got {new_rank}")
    merge_type = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    weights_tensor = torch.tensor([float(weight) for weight in weights], device=deltas[0].device)
    delta = _merge_task_tensors(
        merge_type, deltas, weights_tensor, density, majority_sign_method, combination_type
    )
    if fan_in_fan_out:
        delta = delta.T

    U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
    kept = min(new_rank, S.numel())
    new_B = U[:, :kept] @ torch.diag(S[:kept])
    new_A = Vh[:kept, :]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([new_B.flatten(), new_A.flatten()]), svd_clamp)
        new_B = new_B.clamp(-hi, hi)
        new_A = new_A.clamp(-hi, hi)
    if kept < new_rank:
        new_A = torch.cat([new_A, new_A.new_zeros(new_rank - kept, new_A.shape[1])], dim=0)
        new_B = torch.cat([new_B, new_B.new_zeros(new_B.shape[0], new_rank - kept)], dim=1)
    return new_A, new_B
