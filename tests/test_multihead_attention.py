"""LoRA on nn.MultiheadAttention (in_proj_weight and out_proj, always both), with peft 0.21.2 as the oracle.

Pairs come from ``peft_oracle.build_pair`` (peft's non-trivial adapter reaches ours through peft's saved state
dict). In memory, peft nests the out-projection factors under ``base_layer.out_proj``; we hold them as
``out_proj_lora_A/B`` and save them under peft's keys.

peft 0.21.2 adds the out-projection delta twice (``W_out + 2·s·B A``, in its forward and in merge; peft PR #3774,
open, fixes it). We add it once. So the comparisons of outputs with peft zero the out-projection's ``lora_B``
(both agree exactly then, and every gradient is still compared), and the out-projection's numbers are checked
against a plain ``nn.MultiheadAttention`` holding ``W + s·B A``.
"""

import peft
import pytest
import torch
from peft_oracle import (
    TOLERANCE,
    add_adapter_to_pair,
    assert_loss_and_gradients_match,
    assert_same_tensors,
    reload_in,
    saved_files,
    trainable_names_in_peft,
)
from peft_oracle import (
    build_pair as build_oracle_pair,
)
from torch import nn

import lora_engine
from lora_engine.layers.multihead_attention import LoraMultiheadAttention

EMBED_DIM, HEADS, CLASSES = 16, 4, 3


class TinyAttentionClassifier(nn.Module):
    """Token embedding → one self-attention block (nn.MultiheadAttention, batch first) → mean pool → head."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, EMBED_DIM)
        self.attn = nn.MultiheadAttention(EMBED_DIM, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(EMBED_DIM, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` → logits ``[B, CLASSES]``."""
        hidden = self.embed(input_ids)
        attended, _ = self.attn(hidden, hidden, hidden)
        return self.head(attended.mean(dim=1))


def make_model(seed: int = 0) -> TinyAttentionClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyAttentionClassifier().eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))


def zero_out_proj_B(adapter_name: str = "default"):
    """Zero peft's out-projection ``lora_B`` of ``adapter_name``: hides peft's out_proj bug (module docstring)."""

    def prepare(theirs) -> None:
        with torch.no_grad():
            theirs.get_base_model().attn.base_layer.out_proj.lora_B[adapter_name].weight.zero_()

    return prepare


def build_pair(zero_out_proj: bool = True, **config):
    """(peft model, our model) holding the same adapter; ``zero_out_proj`` hides peft's out_proj bug."""
    config = {"target_modules": ["attn"], "r": 4, **config}
    return build_oracle_pair(make_model, config, zero_out_proj_B() if zero_out_proj else None)


def reference_model(lora_model) -> TinyAttentionClassifier:
    """The base model with ``W + s·B A`` written into ``in_proj_weight`` and ``out_proj.weight`` by hand."""
    reference = make_model()
    attn = lora_model.get_base_model().attn
    with torch.no_grad():
        lora_A, lora_B = attn.lora_factors("default")
        reference.attn.in_proj_weight += attn.scaling["default"] * lora_B @ lora_A
        lora_A, lora_B = attn.out_proj_factors("default")
        reference.attn.out_proj.weight += attn.scaling["default"] * lora_B @ lora_A
    return reference


def our_name_in_peft(name: str) -> str:
    """Our in-memory parameter name → peft's (only the out-projection factors differ)."""
    return name.replace("attn.out_proj_lora_", "attn.base_layer.out_proj.lora_")


def outputs(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_targeting_a_multihead_attention_wraps_it_whole():
    _, ours = build_pair()
    wrapped = [name for name, module in ours.named_modules() if isinstance(module, LoraMultiheadAttention)]
    assert wrapped == ["base_model.model.attn"]


def test_factor_shapes_cover_packed_in_proj_and_out_proj():
    _, ours = build_pair()
    attn = ours.get_base_model().attn
    assert [tuple(t.shape) for t in attn.lora_factors("default")] == [(4, EMBED_DIM), (3 * EMBED_DIM, 4)]
    assert [tuple(t.shape) for t in attn.out_proj_factors("default")] == [(4, EMBED_DIM), (EMBED_DIM, 4)]


def test_trainable_parameter_count_matches_peft():
    theirs, ours = build_pair()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_trainable_parameters_are_peft_ones_under_our_names():
    theirs, ours = build_pair()
    assert trainable_names_in_peft(ours, our_name_in_peft) == trainable_names_in_peft(theirs)


def test_default_init_leaves_outputs_unchanged(tokens):
    base = make_model()
    ours = lora_engine.get_peft_model(make_model(), lora_engine.LoraConfig(target_modules=["attn"]))
    torch.testing.assert_close(outputs(ours, tokens), outputs(base, tokens), **TOLERANCE)


def test_outputs_match_peft(tokens):
    theirs, ours = build_pair()
    assert not torch.allclose(outputs(ours, tokens), outputs(make_model(), tokens))
    torch.testing.assert_close(outputs(ours, tokens), outputs(theirs, tokens), **TOLERANCE)


def test_outputs_equal_base_attention_with_both_deltas_added_once(tokens):
    _, ours = build_pair(zero_out_proj=False)
    torch.testing.assert_close(outputs(ours, tokens), outputs(reference_model(ours), tokens), **TOLERANCE)


def test_peft_0_21_2_adds_the_out_proj_delta_twice_which_we_do_not_copy():
    theirs, ours = build_pair(zero_out_proj=False)
    theirs.merge_adapter()
    ours.merge_adapter()
    base, attn = make_model().attn.out_proj.weight, ours.get_base_model().attn
    delta = attn.scaling["default"] * torch.matmul(*reversed(attn.out_proj_factors("default"))).detach()
    torch.testing.assert_close(
        ours.get_base_model().attn.base_layer.out_proj.weight, base + delta, **TOLERANCE
    )
    their_weight = theirs.get_base_model().attn.base_layer.out_proj.base_layer.weight
    torch.testing.assert_close(their_weight, base + 2 * delta, **TOLERANCE)


def test_attention_weights_are_returned_like_peft(tokens):
    theirs, ours = build_pair()
    hidden = make_model().embed(tokens).detach()
    with torch.no_grad():
        our_out, our_weights = ours.get_base_model().attn(hidden, hidden, hidden)
        their_out, their_weights = theirs.get_base_model().attn(hidden, hidden, hidden)
    torch.testing.assert_close(our_out, their_out, **TOLERANCE)
    torch.testing.assert_close(our_weights, their_weights, **TOLERANCE)


def test_loss_and_every_lora_gradient_match_peft(tokens):
    theirs, ours = build_pair()
    labels = torch.tensor([0, 2])
    assert_loss_and_gradients_match(
        theirs,
        ours,
        lambda model: nn.functional.cross_entropy(model(tokens), labels),
        our_name_in_peft,
        # out_proj's lora_B is zero here (see the module docstring), so its lora_A gets no gradient
        may_be_zero=lambda name: "out_proj.lora_A" in name,
    )


def test_forward_leaves_base_weights_untouched_and_frozen(tokens):
    _, ours = build_pair()
    attn = ours.get_base_model().attn.base_layer
    before = {name: param.detach().clone() for name, param in attn.named_parameters()}
    ours.train()
    ours(tokens).sum().backward()
    for name, param in attn.named_parameters():
        assert isinstance(param, nn.Parameter) and not param.requires_grad and param.grad is None, name
        torch.testing.assert_close(param.detach(), before[name], atol=0, rtol=0)


def test_saved_files_have_peft_keys_and_values(tmp_path):
    their_state, our_state = saved_files(*build_pair(zero_out_proj=False), tmp_path)
    assert_same_tensors(our_state, their_state)


def test_peft_loads_our_saved_adapter_with_equal_outputs(tmp_path, tokens):
    _, ours = build_pair()
    loaded = reload_in(peft, ours, make_model, tmp_path)
    torch.testing.assert_close(outputs(loaded, tokens), outputs(ours, tokens), **TOLERANCE)


def test_we_load_peft_saved_adapter_with_equal_outputs(tmp_path, tokens):
    theirs, _ = build_pair()
    loaded = reload_in(lora_engine, theirs, make_model, tmp_path)
    torch.testing.assert_close(outputs(loaded, tokens), outputs(theirs, tokens), **TOLERANCE)


def test_merged_in_proj_weight_equals_peft_merged_weight():
    theirs, ours = build_pair(zero_out_proj=False)
    theirs.merge_adapter()
    ours.merge_adapter()
    their_attn, our_attn = theirs.get_base_model().attn.base_layer, ours.get_base_model().attn.base_layer
    torch.testing.assert_close(our_attn.in_proj_weight, their_attn.in_proj_weight, **TOLERANCE)


def test_merged_weights_equal_reference_weights():
    _, ours = build_pair(zero_out_proj=False)
    reference = reference_model(ours).attn
    ours.merge_adapter()
    attn = ours.get_base_model().attn.base_layer
    torch.testing.assert_close(attn.in_proj_weight, reference.in_proj_weight, **TOLERANCE)
    torch.testing.assert_close(attn.out_proj.weight, reference.out_proj.weight, **TOLERANCE)


def test_merged_outputs_equal_unmerged_outputs(tokens):
    _, ours = build_pair(zero_out_proj=False)
    unmerged = outputs(ours, tokens)
    ours.merge_adapter()
    torch.testing.assert_close(outputs(ours, tokens), unmerged, **TOLERANCE)


def test_unmerge_restores_base_weights():
    _, ours = build_pair(zero_out_proj=False)
    base = make_model().attn
    ours.merge_adapter()
    ours.unmerge_adapter()
    attn = ours.get_base_model().attn.base_layer
    torch.testing.assert_close(attn.in_proj_weight, base.in_proj_weight, **TOLERANCE)
    torch.testing.assert_close(attn.out_proj.weight, base.out_proj.weight, **TOLERANCE)


def test_merge_and_unload_gives_plain_attention_with_peft_outputs(tokens):
    theirs, ours = build_pair()
    their_model, our_model = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_model.attn) is nn.MultiheadAttention
    assert type(our_model.attn.out_proj) is type(make_model().attn.out_proj)
    assert {name for name, _ in our_model.named_parameters()} == {
        n for n, _ in make_model().named_parameters()
    }
    torch.testing.assert_close(outputs(our_model, tokens), outputs(their_model, tokens), **TOLERANCE)


def test_disabled_adapter_on_merged_model_gives_base_outputs(tokens):
    _, ours = build_pair(zero_out_proj=False)
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(outputs(ours, tokens), outputs(make_model(), tokens), **TOLERANCE)


def test_two_active_adapters_sum_like_peft(tokens):
    theirs, ours = build_pair()
    add_adapter_to_pair(theirs, ours, "other", {"target_modules": ["attn"], "r": 2}, zero_out_proj_B("other"))
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(outputs(ours, tokens), outputs(theirs, tokens), **TOLERANCE)


def test_safe_merge_of_broken_adapter_raises_and_leaves_weights_untouched():
    _, ours = build_pair()
    attn = ours.get_base_model().attn
    with torch.no_grad():
        attn.out_proj_lora_B["default"].weight[0, 0] = float("nan")
    before = attn.base_layer.out_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="attn.*'default'.*out_proj"):
        ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(attn.base_layer.out_proj.weight, before, atol=0, rtol=0)


def test_mixed_adapter_batch_raises_like_peft(tokens):
    _, ours = build_pair()
    ours.eval()
    with pytest.raises(TypeError, match="MultiheadAttention does not support mixed adapter batches"):
        ours(tokens, adapter_names=["default", "__base__"])


def test_different_key_and_value_sizes_are_refused_by_name():
    model = TinyAttentionClassifier(kdim=8)
    with pytest.raises(ValueError, match="^attn: .*kdim=8.*same size"):
        lora_engine.get_peft_model(model, lora_engine.LoraConfig(target_modules=["attn"]))
