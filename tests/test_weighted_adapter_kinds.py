"""``add_weighted_adapter`` on convolutions, ``nn.MultiheadAttention``, DoRA and trainable-token adapters, with
peft 0.21.2 as the oracle (Linear, Conv1D and embeddings: test_weighted_adapter.py).

What peft does with each kind decides ours (``lora_engine.weighted``'s docstring): where peft combines correctly
we give its tensors; where peft raises we raise our own error naming the adapters and the layer kind; where peft
silently returns a wrong adapter we refuse, and a test here shows peft's wrong result, so the refusal has its
reason on record. Sources are two adapters of different alphas on tiny one-layer models.
"""

import peft
import pytest
import torch
from peft_oracle import TOLERANCE, add_adapter_to_pair, assert_same_tensors, build_pair
from torch import nn

import lora_engine

SOURCES, WEIGHTS, NEW = ["default", "other"], [0.7, -0.4], "mix"
FACTOR_TYPES = ["linear", "cat", "ties", "dare_linear"]
SVD_TYPES = ["svd", "magnitude_prune_svd"]


class OneLayer(nn.Module):
    """One target layer ``layer`` and its input shape."""

    def __init__(self, layer: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.MultiheadAttention):
            return self.layer(x, x, x)[0]
        return self.layer(x)


LAYERS = {
    "conv1d": lambda: OneLayer(nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d": lambda: OneLayer(nn.Conv2d(4, 6, 3, stride=2), (2, 4, 7, 7)),
    "conv2d-1x1": lambda: OneLayer(nn.Conv2d(4, 6, 1), (2, 4, 5, 5)),
    "conv3d": lambda: OneLayer(nn.Conv3d(4, 6, (1, 3, 3)), (2, 4, 2, 5, 5)),
    "grouped-conv2d": lambda: OneLayer(nn.Conv2d(4, 6, 3, groups=2), (2, 4, 5, 5)),
    "attention": lambda: OneLayer(nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
    "linear": lambda: OneLayer(nn.Linear(8, 6), (2, 8)),
}


def make(kind: str):
    def make_base() -> OneLayer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LAYERS[kind]().eval()

    return make_base


def build_sources(kind: str, **options):
    """``(peft model, ours)`` holding ``default`` (alpha 8) and ``other`` (alpha 2), rank 2, on ``kind``."""
    theirs, ours = build_pair(make(kind), {"target_modules": ["layer"], "r": 2, "lora_alpha": 8, **options})
    add_adapter_to_pair(
        theirs, ours, "other", {"target_modules": ["layer"], "r": 2, "lora_alpha": 2, **options}
    )
    return theirs, ours


def combine(model, combination_type: str, adapters=SOURCES, weights=WEIGHTS) -> None:
    torch.manual_seed(0)  # the dare types draw masks: the same ones in both libraries
    density = {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}
    model.add_weighted_adapter(adapters, weights, NEW, combination_type=combination_type, **density)


def new_adapter_state(model) -> dict[str, torch.Tensor]:
    """The combined adapter's tensors under peft's saved keys (each library's own export)."""
    library = peft if isinstance(model, peft.PeftModel) else lora_engine
    return library.get_peft_model_state_dict(model, adapter_name=NEW)


def outputs(model, adapter_name: str) -> torch.Tensor:
    model.set_adapter(adapter_name)
    x = torch.randn(model.get_base_model().input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def effective_delta(layer, adapter_name: str) -> torch.Tensor:
    """``s · B A`` of one factor pair as the matrix ``[out, in·kernel]``."""
    lora_A, lora_B = layer
    return lora_B.reshape(lora_B.shape[0], -1) @ lora_A.reshape(lora_A.shape[0], -1)


# -------------------------------------------------------------------------------- convolutions: supported
CONV_CASES = [
    *[(kind, ct) for kind in ("conv1d", "conv2d", "conv2d-1x1", "conv3d") for ct in FACTOR_TYPES],
    *[(kind, ct) for kind in ("conv2d", "conv2d-1x1") for ct in SVD_TYPES],
    ("grouped-conv2d", "linear"),
    ("grouped-conv2d", "ties"),
]


@pytest.mark.parametrize(("kind", "combination_type"), CONV_CASES)
def test_combined_conv_adapter_equals_peft(kind, combination_type):
    theirs, ours = build_sources(kind)
    combine(theirs, combination_type)
    combine(ours, combination_type)
    assert_same_tensors(new_adapter_state(ours), new_adapter_state(theirs), **TOLERANCE)
    torch.testing.assert_close(outputs(ours, NEW), outputs(theirs, NEW), **TOLERANCE)


def test_cat_of_conv_adapters_is_exactly_their_weighted_sum():
    _, ours = build_sources("conv2d")
    combine(ours, "cat")
    layer = ours.get_base_model().layer
    combined = effective_delta(layer.lora_factors(NEW), NEW) * layer.scaling[NEW]
    expected = sum(
        weight * layer.scaling[name] * effective_delta(layer.lora_factors(name), name)
        for name, weight in zip(SOURCES, WEIGHTS)
    )
    torch.testing.assert_close(combined, expected, **TOLERANCE)


# -------------------------------------------------------------------------------- convolutions: refused
@pytest.mark.parametrize("kind", ["conv1d", "conv3d", "grouped-conv2d"])
def test_svd_types_on_convs_peft_cannot_factor_are_refused_naming_adapters_and_kind(kind):
    theirs, ours = build_sources(kind)
    with pytest.raises(RuntimeError):  # peft reshapes only ungrouped Conv2d deltas and fails on the others
        combine(theirs, "svd")
    conv = type(ours.get_base_model().layer.base_layer).__name__
    with pytest.raises(
        ValueError, match=rf"\['default', 'other'\] on 'layer' \({conv}.*'svd'.*ungrouped Conv2d"
    ):
        combine(ours, "svd")
    assert NEW not in ours.peft_config


def test_peft_cat_of_grouped_conv_adapters_is_silently_wrong():
    """Why we refuse it: with weights (1, 0) the combination must be the first source; peft's is not."""
    theirs, _ = build_sources("grouped-conv2d")
    combine(theirs, "cat", weights=[1.0, 0.0])
    assert not torch.allclose(outputs(theirs, NEW), outputs(theirs, "default"), atol=1e-4)


def test_cat_of_grouped_conv_adapters_is_refused_naming_adapters_and_groups():
    _, ours = build_sources("grouped-conv2d")
    with pytest.raises(ValueError, match=r"\['default', 'other'\] on 'layer' \(Conv2d, groups=2\).*'cat'"):
        combine(ours, "cat")
    assert NEW not in ours.peft_config


# -------------------------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "ties"])
def test_combined_attention_adapter_factors_equal_peft(combination_type):
    # Factors, not outputs: peft 0.21.2's forward adds the out-projection delta twice (test_multihead_attention).
    theirs, ours = build_sources("attention")
    combine(theirs, combination_type)
    combine(ours, combination_type)
    state = new_adapter_state(ours)
    assert {key.split(".lora_")[0] for key in state} == {
        "base_model.model.layer",
        "base_model.model.layer.base_layer.out_proj",
    }
    assert_same_tensors(state, new_adapter_state(theirs), **TOLERANCE)


def test_cat_of_attention_adapters_is_exactly_their_weighted_sum_on_both_projections():
    _, ours = build_sources("attention")
    combine(ours, "cat")
    layer = ours.get_base_model().layer
    for pair_of in (layer.lora_factors, layer.out_proj_factors):
        combined = effective_delta(pair_of(NEW), NEW) * layer.scaling[NEW]
        expected = sum(
            weight * layer.scaling[name] * effective_delta(pair_of(name), name)
            for name, weight in zip(SOURCES, WEIGHTS)
        )
        torch.testing.assert_close(combined, expected, **TOLERANCE)


# -------------------------------------------------------------------------------- DoRA
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_peft_combination_of_one_dora_source_does_not_give_it_back(kind):
    """Why we refuse DoRA: peft's new magnitude is ‖W‖ from injection, not the source's magnitude."""
    theirs, _ = build_sources(kind, use_dora=True)
    combine(theirs, "linear", adapters=["default"], weights=[1.0])
    assert not torch.allclose(outputs(theirs, NEW), outputs(theirs, "default"), atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_combining_dora_adapters_is_refused_naming_adapters_and_kind(kind):
    _, ours = build_sources(kind, use_dora=True)
    kind_name = type(ours.get_base_model().layer.base_layer).__name__
    with pytest.raises(
        ValueError, match=rf"\['default'\] on 'layer' \({kind_name}\) use use_dora=True.*magnitude"
    ):
        combine(ours, "linear", adapters=["default"], weights=[1.0])
    assert NEW not in ours.peft_config


# -------------------------------------------------------------------------------- trainable tokens
class EmbedThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layer = nn.Linear(8, 6)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(input_ids))


def make_embed_model() -> EmbedThenLinear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EmbedThenLinear().eval()


def randomize_token_rows(theirs) -> None:
    """Trained-looking rows for every adapter (peft starts them at the embedding's own rows)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()


def build_token_sources():
    config = {"target_modules": ["layer"], "r": 2, "trainable_token_indices": {"embed": [1, 3]}}
    theirs, ours = build_pair(make_embed_model, config, randomize_token_rows)
    add_adapter_to_pair(theirs, ours, "other", config, randomize_token_rows)
    return theirs, ours


def test_peft_combination_of_trainable_tokens_drops_the_trained_rows():
    """Why we refuse trainable tokens: peft's combined adapter holds the embedding's original rows."""
    theirs, _ = build_token_sources()
    combine(theirs, "linear")
    token_adapter = theirs.get_base_model().embed.token_adapter
    original_rows = make_embed_model().embed.weight[[1, 3]]
    torch.testing.assert_close(token_adapter.trainable_tokens_delta[NEW].detach(), original_rows)
    assert not torch.allclose(token_adapter.trainable_tokens_delta["default"].detach(), original_rows)


def test_combining_trainable_tokens_is_refused_naming_adapters_and_kind():
    _, ours = build_token_sources()
    with pytest.raises(
        ValueError, match=r"\['default', 'other'\] on 'embed' \(Embedding, trainable_token_indices\)"
    ):
        combine(ours, "linear")
    assert NEW not in ours.peft_config
