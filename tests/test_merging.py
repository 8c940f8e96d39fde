"""lora_engine.merging against peft 0.21.2 as the oracle.

The task-arithmetic helpers are compared with ``peft.utils.merge_utils`` on random tensors (the random ones after
the same ``torch.manual_seed``: equal only if both draw from the RNG in the same order). The per-layer
combinations are compared with the factors that peft's ``add_weighted_adapter`` writes into a tiny model holding
an ``nn.Embedding``, an ``nn.Linear`` and a transformers ``Conv1D`` (``fan_in_fan_out``), with two adapters of
different alphas.
"""

import math
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import merge_utils
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine import merging

SEED = 1234
WEIGHTS = [0.7, 0.4]
DENSITY = 0.5


def _task_tensors(dtype: torch.dtype = torch.float32, integer_valued: bool = False) -> list[torch.Tensor]:
    """Three [6, 5] task tensors; integer values make magnitude ties and zero sign sums common."""
    generator = torch.Generator().manual_seed(0)
    if integer_valued:
        return [torch.randint(-2, 3, (6, 5), generator=generator).to(dtype) for _ in range(3)]
    return [torch.randn(6, 5, generator=generator).to(dtype) for _ in range(3)]


def _weights() -> torch.Tensor:
    return torch.tensor([0.7, -0.4, 1.3])


def _seeded(function, *args, **kwargs):
    torch.manual_seed(SEED)
    return function(*args, **kwargs)


# --------------------------------------------------------------------------------------------- helpers vs peft
TENSOR_KINDS = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="fp32-ties"),
    pytest.param(torch.bfloat16, False, id="bf16"),
]


@pytest.mark.parametrize("dtype, integer_valued", TENSOR_KINDS)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_prune_equals_peft_for_both_methods(dtype, integer_valued, density):
    tensor = _task_tensors(dtype, integer_valued)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density 1 warns in both
        for method, rescale in [("magnitude", False), ("random", False), ("random", True)]:
            ours = _seeded(merging.prune, tensor, density, method, rescale=rescale)
            theirs = _seeded(merge_utils.prune, tensor, density, method, rescale=rescale)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype, integer_valued", TENSOR_KINDS)
def test_pruning_primitives_equal_peft(dtype, integer_valued):
    tensor = _task_tensors(dtype, integer_valued)[1]
    assert torch.equal(
        merging.magnitude_based_pruning(tensor, 0.4), merge_utils.magnitude_based_pruning(tensor, 0.4)
    )
    for rescale in (False, True):
        ours = _seeded(merging.random_pruning, tensor, 0.4, rescale)
        theirs = _seeded(merge_utils.random_pruning, tensor, 0.4, rescale)
        assert torch.equal(ours, theirs)


def test_prune_at_density_one_warns_and_returns_the_tensor_untouched():
    tensor = _task_tensors()[0]
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        assert merging.prune(tensor, 1.0, "random") is tensor


def test_prune_refuses_negative_density_and_unknown_method():
    tensor = _task_tensors()[0]
    with pytest.raises(ValueError, match="Density should be >= 0, got -0.1"):
        merging.prune(tensor, -0.1, "magnitude")
    with pytest.raises(ValueError, match="'lowest'"):
        merging.prune(tensor, 0.5, "lowest")


@pytest.mark.parametrize("dtype, integer_valued", TENSOR_KINDS)
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_majority_sign_mask_and_disjoint_merge_equal_peft(dtype, integer_valued, method):
    stacked = torch.stack(_task_tensors(dtype, integer_valued))
    mask = merging.calculate_majority_sign_mask(stacked, method)
    assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method))
    ours = merging.disjoint_merge(stacked, mask)
    theirs = merge_utils.disjoint_merge(stacked, mask)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


def test_majority_sign_ties_go_to_plus_one():
    stacked = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])  # columns sum to 0, -1, 0
    assert merging.calculate_majority_sign_mask(stacked).tolist() == [
        [True, True, False],
        [False, False, False],
    ]


def test_majority_sign_refuses_unknown_method_like_peft():
    with pytest.raises(RuntimeError, match="median"):
        merging.calculate_majority_sign_mask(torch.ones(2, 3), "median")


@pytest.mark.parametrize("dtype, integer_valued", TENSOR_KINDS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_task_tensor_merges_equal_peft_with_the_same_seed(dtype, integer_valued, density):
    task_tensors, weights = _task_tensors(dtype, integer_valued), _weights()
    calls = [
        ("task_arithmetic", (task_tensors, weights)),
        ("magnitude_prune", (task_tensors, weights, density)),
        ("ties", (task_tensors, weights, density, "total")),
        ("ties", (task_tensors, weights, density, "frequency")),
        ("dare_linear", (task_tensors, weights, density)),
        ("dare_ties", (task_tensors, weights, density, "total")),
        ("dare_ties", (task_tensors, weights, density, "frequency")),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, args in calls:
            ours = _seeded(getattr(merging, name), *args)
            theirs = _seeded(getattr(merge_utils, name), *args)
            assert ours.dtype == theirs.dtype, name
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=name)


def test_dare_consumes_the_rng_like_peft_across_calls():
    task_tensors, weights = _task_tensors(), _weights()
    torch.manual_seed(SEED)
    ours = [merging.dare_ties(task_tensors, weights, 0.3) for _ in range(3)] + [torch.rand(4)]
    torch.manual_seed(SEED)
    theirs = [merge_utils.dare_ties(task_tensors, weights, 0.3) for _ in range(3)] + [torch.rand(4)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# ------------------------------------------------------------------------------ add_weighted_adapter vs peft
def _peft_model(ranks=(4, 4), use_rslora=False) -> peft.PeftModel:
    """Embedding(20, 16) → Linear(16, 12) → ReLU → Conv1D(12 → 8), adapters "a" (alpha 8) and "b" (alpha 16)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 12), nn.ReLU(), Conv1D(8, 12))

    def config(r, alpha):
        return peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["0", "1", "3"],
            init_lora_weights=False,
            use_rslora=use_rslora,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft corrects fan_in_fan_out for the Conv1D, with a warning
        model = peft.get_peft_model(base, config(ranks[0], 8), adapter_name="a")
        model.add_adapter("b", config(ranks[1], 16))
    return model


def _factors(layer: PeftLoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight.data, layer.lora_B[adapter].weight.data
    return layer.lora_embedding_A[adapter].data, layer.lora_embedding_B[adapter].data


def _delta_layout_is_transposed(layer: PeftLoraLayer) -> bool:
    return bool(layer.lora_embedding_A) or getattr(layer, "fan_in_fan_out", False)


def _peft_and_ours(monkeypatch, combination_type, model=None, **kwargs):
    """Run peft's ``add_weighted_adapter`` into "m" and ours layer by layer from the same sources and seed.

    Returns ``[(layer name, (peft A, peft B), (our A, our B))]`` in peft's layer order, so that random types
    draw from the RNG in the same order. peft's injection of "m" draws from the RNG before it combines; the
    seed is set again right after it.
    """
    model = model or _peft_model()
    lora_model = model.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **inject_kwargs):
        inject(*args, **inject_kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(lora_model, "inject_adapter", inject_then_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type=combination_type, **kwargs)

    svd_kwargs = {key: kwargs[key] for key in ("svd_clamp", "svd_full_matrices", "density") if key in kwargs}
    pairs = []
    torch.manual_seed(SEED)
    for name, layer in lora_model.model.named_modules():
        if not isinstance(layer, PeftLoraLayer):
            continue
        lora_As, lora_Bs = zip(*(_factors(layer, adapter) for adapter in ("a", "b")))
        scalings = [layer.scaling[adapter] for adapter in ("a", "b")]
        if combination_type in merging.SVD_COMBINATION_TYPES:
            transposed = _delta_layout_is_transposed(layer)
            # ΔW_i exactly as peft's get_delta_weight computes it, in the base weight's layout.
            deltas = [
                ((B @ A).T if transposed else B @ A) * scaling
                for A, B, scaling in zip(lora_As, lora_Bs, scalings)
            ]
            ours = merging.combine_deltas_svd(
                deltas,
                WEIGHTS,
                combination_type,
                model.peft_config["m"].r,
                majority_sign_method=kwargs.get("majority_sign_method", "total"),
                fan_in_fan_out=transposed,
                **svd_kwargs,
            )
        else:
            ours = merging.combine_factors(
                lora_As,
                lora_Bs,
                scalings,
                WEIGHTS,
                combination_type,
                density=kwargs.get("density"),
                majority_sign_method=kwargs.get("majority_sign_method", "total"),
            )
        pairs.append((name, _factors(layer, "m"), ours))
    assert len(pairs) == 3
    return pairs


COMBINATION_CASES = [
    pytest.param("cat", {}, id="cat"),
    pytest.param("linear", {}, id="linear"),
    pytest.param("ties", {"density": DENSITY}, id="ties"),
    pytest.param("ties", {"density": DENSITY, "majority_sign_method": "frequency"}, id="ties-frequency"),
    pytest.param("dare_linear", {"density": DENSITY}, id="dare_linear"),
    pytest.param("dare_ties", {"density": DENSITY}, id="dare_ties"),
    pytest.param("magnitude_prune", {"density": DENSITY}, id="magnitude_prune"),
    pytest.param("svd", {}, id="svd"),
    pytest.param("svd", {"svd_clamp": 0.9}, id="svd-clamp"),
    pytest.param("svd", {"svd_rank": 2, "svd_full_matrices": False}, id="svd-rank2-reduced"),
    pytest.param("ties_svd", {"density": DENSITY}, id="ties_svd"),
    pytest.param("dare_linear_svd", {"density": DENSITY}, id="dare_linear_svd"),
    pytest.param(
        "dare_ties_svd",
        {"density": DENSITY, "majority_sign_method": "frequency"},
        id="dare_ties_svd-frequency",
    ),
    pytest.param("magnitude_prune_svd", {"density": DENSITY}, id="magnitude_prune_svd"),
]


@pytest.mark.parametrize("combination_type, kwargs", COMBINATION_CASES)
def test_combination_gives_the_factors_peft_writes(monkeypatch, combination_type, kwargs):
    for name, (peft_A, peft_B), (our_A, our_B) in _peft_and_ours(monkeypatch, combination_type, **kwargs):
        assert our_A.dtype == peft_A.dtype and our_B.dtype == peft_B.dtype, name
        # Same inputs, same ops: bit for bit (the SVD included, on one machine).
        torch.testing.assert_close(our_A, peft_A, rtol=0, atol=0, msg=f"A of {name}")
        torch.testing.assert_close(our_B, peft_B, rtol=0, atol=0, msg=f"B of {name}")


def test_cat_of_different_ranks_gives_peft_factors(monkeypatch):
    for name, (peft_A, peft_B), (our_A, our_B) in _peft_and_ours(
        monkeypatch, "cat", _peft_model(ranks=(3, 5))
    ):
        assert our_A.shape[0] == 8, name
        assert torch.equal(our_A, peft_A) and torch.equal(our_B, peft_B), name


def test_rslora_sources_give_peft_factors_meant_for_scaling_one(monkeypatch):
    model = _peft_model(use_rslora=True)
    pairs = _peft_and_ours(monkeypatch, "cat", model)
    layer = model.base_model.model[1]
    for _, (peft_A, peft_B), (our_A, our_B) in pairs:
        assert torch.equal(our_A, peft_A) and torch.equal(our_B, peft_B)
    # Our B A is the intended Σ w_i ΔW_i; peft's new adapter keeps rslora and scales it by √r (peft#3761).
    _, (our_A, our_B) = pairs[1][1], pairs[1][2]
    intended = sum(weight * layer.get_delta_weight(adapter) for weight, adapter in zip(WEIGHTS, ("a", "b")))
    torch.testing.assert_close(our_B @ our_A, intended)
    assert layer.scaling["m"] == pytest.approx(math.sqrt(8))


# ----------------------------------------------------------------------------------------- direct properties
def test_cat_product_is_exactly_the_weighted_sum_of_deltas():
    generator = torch.Generator().manual_seed(0)
    ranks, scalings = (3, 5), (2.0, 0.5)
    lora_As = [torch.randn(r, 16, generator=generator) for r in ranks]
    lora_Bs = [torch.randn(12, r, generator=generator) for r in ranks]
    new_A, new_B = merging.combine_factors(lora_As, lora_Bs, scalings, [0.7, -0.4], "cat")
    assert new_A.shape == (8, 16) and new_B.shape == (12, 8)
    expected = sum(w * s * B @ A for A, B, s, w in zip(lora_As, lora_Bs, scalings, [0.7, -0.4]))
    torch.testing.assert_close(new_B @ new_A, expected)


def test_svd_with_rank_above_the_matrix_rank_pads_with_zeros_and_reconstructs_exactly():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 12, generator=generator) for _ in range(2)]
    new_A, new_B = merging.combine_deltas_svd(deltas, WEIGHTS, "svd", new_rank=10)
    assert new_A.shape == (10, 12) and new_B.shape == (8, 10)
    assert not new_A[8:].any() and not new_B[:, 8:].any()
    torch.testing.assert_close(new_B @ new_A, 0.7 * deltas[0] + 0.4 * deltas[1], atol=1e-5, rtol=1e-5)


def test_svd_of_half_precision_deltas_computes_and_returns_fp32():
    deltas = [torch.randn(8, 12).to(torch.bfloat16) for _ in range(2)]
    new_A, new_B = merging.combine_deltas_svd(deltas, WEIGHTS, "svd", new_rank=4)
    assert new_A.dtype == new_B.dtype == torch.float32


def test_linear_with_unequal_ranks_raises_naming_them_as_peft_refuses():
    with pytest.raises(ValueError, match=r"same r value.*\[4, 6\]"):
        merging.new_rank([4, 6], "linear")
    with pytest.raises(ValueError, match="same r value"):
        _peft_model(ranks=(4, 6)).add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="linear")


def test_combine_factors_refuses_unequal_layer_ranks_outside_cat():
    lora_As = [torch.randn(4, 16), torch.randn(6, 16)]
    lora_Bs = [torch.randn(12, 4), torch.randn(12, 6)]
    with pytest.raises(ValueError, match=r"ties.*\[4, 6\]"):
        merging.combine_factors(lora_As, lora_Bs, [1.0, 1.0], WEIGHTS, "ties", density=0.5)


def test_pruning_types_refuse_a_missing_density():
    deltas = [torch.randn(8, 12) for _ in range(2)]
    with pytest.raises(ValueError, match="'ties_svd'.*density"):
        merging.combine_deltas_svd(deltas, WEIGHTS, "ties_svd", new_rank=2)


@pytest.mark.parametrize(
    "combination_type, svd_rank",
    [
        ("cat", None),
        ("svd", None),
        ("svd", 3),
        ("dare_ties_svd", None),
        ("linear", None),
        ("magnitude_prune", None),
    ],
)
def test_new_rank_and_type_follow_peft(combination_type, svd_rank):
    ranks = (4, 4) if combination_type in ("linear", "magnitude_prune") else (4, 6)
    lora_model = _peft_model(ranks=ranks).base_model
    for adapters in (["a", "b"], ["b"]):
        peft_type, peft_rank, _ = lora_model._check_add_weighted_adapter(adapters, combination_type, svd_rank)
        our_type = merging.resolve_combination_type(combination_type, len(adapters))
        our_ranks = [lora_model.peft_config[adapter].r for adapter in adapters]
        assert (our_type, merging.new_rank(our_ranks, our_type, svd_rank)) == (peft_type, peft_rank)


def test_unknown_combination_type_is_refused():
    with pytest.raises(ValueError, match="Invalid combination_type: 'mean'"):
        merging.resolve_combination_type("mean", 1)
    with pytest.raises(ValueError, match="combine_deltas_svd"):
        merging.combine_factors([torch.ones(2, 3)], [torch.ones(4, 2)], [1.0], [1.0], "svd")
