"""``trainable_token_indices`` (trainable embedding rows) next to LoRA, with peft 0.21.2 as the oracle, on a tiny
Llama with untied and with tied (``tie_word_embeddings``) input/output embeddings.

Pairs come from ``peft_oracle.build_pair``; peft's rows are set to random values first (so the adapter changes the
outputs) and reach ours through peft's saved state dict.
"""

import peft
import pytest
import torch
from conftest import tiny_llama_config
from peft_oracle import (
    TOLERANCE,
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
from transformers import LlamaForCausalLM

import lora_engine
from lora_engine.layers.trainable_tokens import TrainableTokens

TOKENS = [1, 5, 7]
EMBED = "model.embed_tokens"


def make_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    config = tiny_llama_config()
    config.tie_word_embeddings = tied
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 7, 3, 9], [7, 7, 2, 1, 0]])


def randomize_token_rows(theirs) -> None:
    """Trained-looking rows (peft starts them at the embedding's own rows, a no-op)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()


def build_pair(tied: bool = False, **config):
    config = {"target_modules": ["q_proj"], "trainable_token_indices": TOKENS, **config}
    return build_oracle_pair(lambda: make_llama(tied), config, randomize_token_rows)


def our_name_in_peft(name: str) -> str:
    return name.replace(".trainable_tokens_delta.", ".token_adapter.trainable_tokens_delta.")


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def embedding_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])


@TIED
def test_trainable_parameter_count_matches_peft(tied):
    theirs, ours = build_pair(tied)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@TIED
def test_trainable_parameters_are_peft_ones_under_our_names(tied):
    theirs, ours = build_pair(tied)
    assert trainable_names_in_peft(ours, our_name_in_peft) == trainable_names_in_peft(theirs)


def test_tied_output_embedding_shares_the_input_rows():
    _, ours = build_pair(tied=True)
    model = ours.get_base_model()
    assert isinstance(model.lm_head, TrainableTokens) and isinstance(
        model.get_submodule(EMBED), TrainableTokens
    )
    shared = model.lm_head.trainable_tokens_delta["default"]
    assert shared is model.get_submodule(EMBED).trainable_tokens_delta["default"]


def test_untied_output_embedding_is_left_alone():
    _, ours = build_pair(tied=False)
    assert type(ours.get_base_model().lm_head) is nn.Linear


@TIED
def test_default_init_leaves_logits_unchanged(tied, input_ids):
    config = lora_engine.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS)
    ours = lora_engine.get_peft_model(make_llama(tied), config)
    torch.testing.assert_close(logits(ours, input_ids), logits(make_llama(tied), input_ids), **TOLERANCE)


@TIED
def test_logits_match_peft(tied, input_ids):
    theirs, ours = build_pair(tied)
    assert not torch.allclose(logits(ours, input_ids), logits(make_llama(tied), input_ids))
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_dict_of_module_names_matches_peft(input_ids):
    theirs, ours = build_pair(trainable_token_indices={"embed_tokens": [2, 3]})
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


@TIED
def test_loss_and_every_gradient_match_peft(tied, input_ids):
    theirs, ours = build_pair(tied)
    assert_loss_and_gradients_match(
        theirs, ours, lambda model: model(input_ids=input_ids, labels=input_ids).loss, our_name_in_peft
    )


def test_training_leaves_the_embedding_weight_frozen_and_unwritten(input_ids):
    _, ours = build_pair()
    before = embedding_weight(ours)
    ours.train()
    ours(input_ids=input_ids, labels=input_ids).loss.backward()
    weight = ours.get_input_embeddings().weight
    assert not weight.requires_grad and weight.grad is None
    torch.testing.assert_close(weight.detach(), before, atol=0, rtol=0)


@TIED
def test_saved_files_have_peft_keys_and_values(tied, tmp_path):
    their_state, our_state = saved_files(*build_pair(tied), tmp_path)
    assert f"base_model.model.{EMBED}.token_adapter.trainable_tokens_delta" in our_state
    assert_same_tensors(our_state, their_state)


@TIED
def test_peft_loads_our_saved_adapter_with_equal_logits(tied, tmp_path, input_ids):
    _, ours = build_pair(tied)
    loaded = reload_in(peft, ours, lambda: make_llama(tied), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), **TOLERANCE)


@TIED
def test_we_load_peft_saved_adapter_with_equal_logits(tied, tmp_path, input_ids):
    theirs, _ = build_pair(tied)
    loaded = reload_in(lora_engine, theirs, lambda: make_llama(tied), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(theirs, input_ids), **TOLERANCE)


@TIED
def test_merged_embedding_weight_equals_peft_merged_weight(tied):
    theirs, ours = build_pair(tied)
    theirs.merge_adapter()
    ours.merge_adapter()
    torch.testing.assert_close(embedding_weight(ours), embedding_weight(theirs), **TOLERANCE)


def test_unmerge_restores_embedding_weight():
    _, ours = build_pair(tied=True)
    before = embedding_weight(ours)
    ours.merge_adapter()
    assert not torch.equal(embedding_weight(ours), before)
    ours.unmerge_adapter()
    torch.testing.assert_close(embedding_weight(ours), before, atol=0, rtol=0)


@TIED
def test_merge_and_unload_gives_plain_layers_with_peft_logits(tied, input_ids):
    theirs, ours = build_pair(tied)
    their_model, our_model = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_model.model.embed_tokens) is nn.Embedding and type(our_model.lm_head) is nn.Linear
    assert (our_model.lm_head.weight is our_model.model.embed_tokens.weight) is tied
    torch.testing.assert_close(logits(our_model, input_ids), logits(their_model, input_ids), **TOLERANCE)


def test_disabled_adapter_gives_base_logits(input_ids):
    _, ours = build_pair(tied=True)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, input_ids), logits(make_llama(True), input_ids), **TOLERANCE)


def test_index_outside_the_vocabulary_is_refused_by_value():
    config = lora_engine.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 128])
    with pytest.raises(
        ValueError, match=r"trainable_token_indices \[128\] are outside the embedding's 128 rows"
    ):
        lora_engine.get_peft_model(make_llama(), config)


def test_unknown_module_is_refused_by_name():
    config = lora_engine.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embeddings": [1]})
    with pytest.raises(ValueError, match="trainable_token_indices names 'embeddings', which is no module"):
        lora_engine.get_peft_model(make_llama(), config)


def test_same_module_in_modules_to_save_is_refused_as_in_peft():
    config = lora_engine.LoraConfig(
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [1]},
        modules_to_save=["embed_tokens"],
    )
    with pytest.raises(
        ValueError, match="'embed_tokens' is in modules_to_save .* and in trainable_token_indices"
    ):
        lora_engine.get_peft_model(make_llama(), config)
