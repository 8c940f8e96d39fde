"""LoRA on nn.Parameters (``target_parameters``), with peft 0.21.2 as the oracle, on tiny MoE models built from
transformers configs: Mixtral (experts stacked ``[E, out, in]``) and GPT-OSS (``is_transposed``: ``[E, in, out]``).

Pairs come from ``peft_oracle.build_pair`` (peft's non-trivial adapter reaches ours through peft's saved state
dict). peft nests one wrapper per parameter; we hold both in one and save under peft's keys.
"""

import time

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
from reliability_helpers import CONFIG_FILE, WEIGHTS_FILE, as_peft_saved, edit_config
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import lora_engine
from lora_engine.layers.parameters import LoraParameters

VOCAB = 64
EXPERTS = "model.layers.0.mlp.experts"
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def make_mixtral(seed: int = 0) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(config).eval()


def make_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    config = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=3,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GptOssForCausalLM(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def build_pair(make=make_mixtral, **config):
    return build_oracle_pair(make, {"target_modules": [], "target_parameters": BOTH, "r": 2, **config})


def our_name_in_peft(name: str) -> str:
    """Our in-memory factor name → peft's: down_proj's wrapper is outermost, gate_up_proj's inside it."""
    return (
        name.replace(".lora_A.down_proj.", ".lora_A.")
        .replace(".lora_B.down_proj.", ".lora_B.")
        .replace(".lora_A.gate_up_proj.", ".base_layer.lora_A.")
        .replace(".lora_B.gate_up_proj.", ".base_layer.lora_B.")
    )


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def expert_weights(model) -> dict[str, torch.Tensor]:
    """The two stacked expert parameters of the model's first layer, through any wrapper."""
    experts = model.get_base_model().get_submodule(EXPERTS)
    while not isinstance(experts, MixtralExperts) and hasattr(experts, "base_layer"):
        experts = experts.base_layer
    return {name: getattr(experts, name).detach().clone() for name in ("gate_up_proj", "down_proj")}


# ---------------------------------------------------------------------------------------------- Mixtral
def test_module_holding_targeted_parameters_is_wrapped_once():
    _, ours = build_pair()
    wrapped = {name: module for name, module in ours.named_modules() if isinstance(module, LoraParameters)}
    assert list(wrapped) == [f"base_model.model.{EXPERTS}"]
    assert wrapped[f"base_model.model.{EXPERTS}"].parameter_names == ["gate_up_proj", "down_proj"]


def test_trainable_parameter_count_matches_peft():
    theirs, ours = build_pair()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_trainable_parameters_are_peft_ones_under_our_names():
    theirs, ours = build_pair()
    assert trainable_names_in_peft(ours, our_name_in_peft) == trainable_names_in_peft(theirs)


def test_default_init_leaves_logits_unchanged(input_ids):
    config = lora_engine.LoraConfig(target_modules=[], target_parameters=BOTH)
    ours = lora_engine.get_peft_model(make_mixtral(), config)
    torch.testing.assert_close(logits(ours, input_ids), logits(make_mixtral(), input_ids), **TOLERANCE)


def test_logits_match_peft(input_ids):
    theirs, ours = build_pair()
    assert not torch.allclose(logits(ours, input_ids), logits(make_mixtral(), input_ids))
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_one_targeted_parameter_logits_match_peft(input_ids):
    theirs, ours = build_pair(target_parameters=["experts.down_proj"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_loss_and_every_lora_gradient_match_peft(input_ids):
    theirs, ours = build_pair()
    assert_loss_and_gradients_match(
        theirs, ours, lambda model: model(input_ids=input_ids, labels=input_ids).loss, our_name_in_peft
    )


def test_expert_parameters_stay_frozen_and_unwritten_by_training_steps(input_ids):
    _, ours = build_pair()
    before = expert_weights(ours)
    ours.train()
    ours(input_ids=input_ids, labels=input_ids).loss.backward()
    experts = ours.get_base_model().get_submodule(EXPERTS).base_layer
    for name, value in before.items():
        assert not getattr(experts, name).requires_grad and getattr(experts, name).grad is None
        torch.testing.assert_close(getattr(experts, name).detach(), value, atol=0, rtol=0)


def test_saved_files_have_peft_keys_and_values(tmp_path):
    their_state, our_state = saved_files(*build_pair(), tmp_path)
    assert_same_tensors(our_state, their_state)


def test_peft_loads_our_saved_adapter_with_equal_logits(tmp_path, input_ids):
    _, ours = build_pair()
    loaded = reload_in(peft, ours, make_mixtral, tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), **TOLERANCE)


def test_we_load_peft_saved_adapter_with_equal_logits(tmp_path, input_ids):
    theirs, _ = build_pair()
    loaded = reload_in(lora_engine, theirs, make_mixtral, tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_merged_expert_weights_equal_peft_merged_weights():
    theirs, ours = build_pair()
    theirs.merge_adapter()
    ours.merge_adapter()
    ours_merged, theirs_merged = expert_weights(ours), expert_weights(theirs)
    for name, value in ours_merged.items():
        torch.testing.assert_close(value, theirs_merged[name], **TOLERANCE, msg=name)


def test_unmerge_restores_expert_weights():
    _, ours = build_pair()
    base = expert_weights(ours)
    ours.merge_adapter()
    ours.unmerge_adapter()
    for name, value in expert_weights(ours).items():
        torch.testing.assert_close(value, base[name], **TOLERANCE, msg=name)


def test_merge_and_unload_gives_plain_experts_with_peft_logits(input_ids):
    theirs, ours = build_pair()
    their_model, our_model = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_model.get_submodule(EXPERTS)) is MixtralExperts
    torch.testing.assert_close(logits(our_model, input_ids), logits(their_model, input_ids), **TOLERANCE)


def test_disabled_adapter_gives_base_logits(input_ids):
    _, ours = build_pair()
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, input_ids), logits(make_mixtral(), input_ids), **TOLERANCE)


def test_two_active_adapters_sum_like_peft(input_ids):
    theirs, ours = build_pair()
    add_adapter_to_pair(theirs, ours, "other", {"target_modules": [], "target_parameters": BOTH, "r": 3})
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_target_parameters_together_with_target_modules_match_peft(input_ids):
    theirs, ours = build_pair(target_modules=["q_proj"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_safe_merge_of_broken_adapter_raises_and_leaves_experts_untouched():
    _, ours = build_pair()
    with torch.no_grad():
        ours.get_base_model().get_submodule(EXPERTS).lora_B["down_proj"]["default"].weight[0, 0] = float(
            "nan"
        )
    before = expert_weights(ours)
    with pytest.raises(ValueError, match="experts.*'default'.*'down_proj'"):
        ours.merge_adapter(safe_merge=True)
    for name, value in expert_weights(ours).items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)


def test_str_target_parameters_is_refused_as_in_peft():
    config = lora_engine.LoraConfig(target_modules=[], target_parameters="experts.down_proj")
    with pytest.raises(TypeError, match="target_parameters='experts.down_proj' is a str"):
        lora_engine.get_peft_model(make_mixtral(), config)


def test_dropout_with_target_parameters_is_refused_by_name():
    config = lora_engine.LoraConfig(target_modules=[], target_parameters=BOTH, lora_dropout=0.1)
    with pytest.raises(ValueError, match="target_parameters with lora_dropout=0.1"):
        lora_engine.get_peft_model(make_mixtral(), config)


def test_weight_derived_init_with_target_parameters_is_refused_by_name():
    config = lora_engine.LoraConfig(target_modules=[], target_parameters=BOTH)
    config.init_lora_weights = (
        "pissa"  # refused by LoraConfig itself until the inits land; set after validation
    )
    with pytest.raises(
        ValueError, match="target_parameters with init_lora_weights='pissa' is not supported yet"
    ):
        lora_engine.get_peft_model(make_mixtral(), config)


def test_unmatched_target_parameters_are_refused_by_name():
    config = lora_engine.LoraConfig(target_modules=[], target_parameters=["experts.nothing"])
    with pytest.raises(ValueError, match=r"target_parameters=\['experts.nothing'\] matched no parameter"):
        lora_engine.get_peft_model(make_mixtral(), config)


def test_second_adapter_on_other_parameters_is_refused_as_in_peft():
    _, ours = build_pair()
    config = lora_engine.LoraConfig(target_modules=[], target_parameters=["experts.down_proj"])
    with pytest.raises(ValueError, match="must all target the same parameters"):
        ours.add_adapter("other", config)
    assert list(ours.peft_config) == ["default"]


def test_mixed_adapter_batch_is_refused_as_in_peft(input_ids):
    _, ours = build_pair()
    ours.eval()
    with pytest.raises(ValueError, match="target_parameters does not support mixed adapter batches"):
        ours(input_ids=input_ids, adapter_names=["default", "__base__"])


def test_weighted_adapter_is_refused_as_in_peft():
    _, ours = build_pair()
    with pytest.raises(
        ValueError, match=r"\['default'\] on '.*experts' \(MixtralExperts parameter\(s\).*target_parameters"
    ):
        ours.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture
def saved_folder(tmp_path):
    """Our parameters-only adapter, re-saved with peft's metadata so that an edited config is checked field by
    field (not refused as a torn pair)."""
    _, ours = build_pair()
    ours.save_pretrained(tmp_path)
    return as_peft_saved(tmp_path)


@pytest.mark.parametrize(
    "changes", [{"r": 100_000}, {"rank_pattern": {"gate_up_proj": 100_000}}], ids=["r", "rank_pattern"]
)
def test_parameter_rank_not_matching_the_file_is_refused_before_allocation(saved_folder, changes):
    edit_config(saved_folder, **changes)
    start = time.perf_counter()
    with pytest.raises(
        ValueError,
        match=rf"{WEIGHTS_FILE}'.*experts.base_layer.lora_A.weight has 6 rows.*gate_up_proj r=100000 .*3 experts",
    ):
        lora_engine.PeftModel.from_pretrained(make_mixtral(), saved_folder)
    assert time.perf_counter() - start < 5


def test_absurd_parameter_rank_without_a_saved_factor_is_refused_before_allocation(saved_folder):
    weights = load_file(saved_folder / WEIGHTS_FILE)
    kept = {key: value for key, value in weights.items() if "base_layer" not in key}  # drop gate_up_proj's
    save_file(kept, saved_folder / WEIGHTS_FILE, metadata={"format": "pt"})
    edit_config(saved_folder, rank_pattern={"gate_up_proj": 100_000})

    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}'.*r=100000 for {EXPERTS}.gate_up_proj exceeds.*48"):
        lora_engine.PeftModel.from_pretrained(make_mixtral(), saved_folder)


# ---------------------------------------------------------------------------------------------- GPT-OSS
def test_transposed_experts_logits_match_peft(input_ids):
    theirs, ours = build_pair(make_gpt_oss)
    assert not torch.allclose(logits(ours, input_ids), logits(make_gpt_oss(), input_ids))
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_transposed_experts_merge_and_unload_matches_peft(input_ids):
    theirs, ours = build_pair(make_gpt_oss)
    their_model, our_model = theirs.merge_and_unload(), ours.merge_and_unload()
    torch.testing.assert_close(logits(our_model, input_ids), logits(their_model, input_ids), **TOLERANCE)
