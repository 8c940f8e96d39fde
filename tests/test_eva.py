"""EVA (``init_lora_weights="eva"``), peft 0.21.2 as the oracle: on a tiny Llama and an in-memory dataloader, the
components, the rank redistribution, the rewritten config and the saved adapter equal peft's."""

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.eva import get_eva_state_dict as peft_get_eva_state_dict
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize_lora_eva_weights
from test_qlora import load  # noqa: F401  (fixture: the tiny Llama of conftest.tiny_llama_4bit_folder, in 4 bits)
from transformers import LlamaConfig, LlamaForCausalLM

import lora_engine
from lora_engine import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from lora_engine.tuners.lora import Linear, LoraLayer


@pytest.fixture(autouse=True)
def one_thread():
    """EVA runs many tiny forwards; torch's thread pool only adds contention at these sizes (25× slower on a busy
    2-core machine), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(count=4, seed=1):
    """Batches of 4×12 tokens with a padded row and masked labels: both masks matter to EVA."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(count):
        input_ids = torch.randint(0, 128, (4, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 9:] = 0
        labels = input_ids.clone()
        labels[1, :3] = -100
        found.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return found


def eva_pair(make, eva_config=None, **config):
    """(peft's model, ours), each built with EVA on the same base and initialised from the same batches."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "init_lora_weights": "eva", **config}
    eva_config = eva_config or {"rho": 2.0, "tau": 0.9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            make(), peft.LoraConfig(**config, eva_config=peft.EvaConfig(**eva_config)), low_cpu_mem_usage=True
        )
        peft_initialize_lora_eva_weights(theirs, batches(), show_progress_bar=False)
        ours = lora_engine.get_peft_model(
            make(), lora_engine.LoraConfig(**config, eva_config=EvaConfig(**eva_config))
        )
        initialize_lora_eva_weights(ours, batches(), show_progress_bar=False)
    return theirs, ours


def adapter_tensors(model):
    return {key: value for key, value in model.state_dict().items() if "lora_" in key}


def assert_same_adapters(theirs, ours):
    expected, found = adapter_tensors(theirs), adapter_tensors(ours)
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)


def three_layer_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_components_and_redistributed_ranks_equal_peft(llama_factory):
    theirs, ours = eva_pair(llama_factory)
    assert_same_adapters(theirs, ours)
    expected, found = theirs.peft_config["default"], ours.peft_config["default"]
    assert found.rank_pattern == expected.rank_pattern and found.rank_pattern  # ranks did move
    assert found.alpha_pattern == expected.alpha_pattern
    assert sorted(found.target_modules) == sorted(expected.target_modules)


def test_rho_one_keeps_every_rank_and_equals_peft(llama_factory):
    theirs, ours = eva_pair(llama_factory, {"rho": 1.0, "tau": 0.9})
    assert_same_adapters(theirs, ours)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern == {}


def test_whitened_components_equal_peft_on_layers_with_their_own_inputs(llama_factory):
    # peft whitens a component in place, so layers sharing one SVD (q/k/v) would be whitened again: see the report.
    eva = {"rho": 2.0, "tau": 0.9, "whiten": True}
    theirs, ours = eva_pair(llama_factory, eva, target_modules=["q_proj", "o_proj", "down_proj"])
    assert_same_adapters(theirs, ours)


def test_state_dict_of_a_plain_model_equals_peft(llama_factory):
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": "eva"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_config = peft.LoraConfig(**config, eva_config=peft.EvaConfig(tau=0.9))
        our_config = lora_engine.LoraConfig(**config, eva_config=EvaConfig(tau=0.9))
    expected = peft_get_eva_state_dict(llama_factory(), batches(), their_config, show_progress_bar=False)
    found = get_eva_state_dict(llama_factory(), batches(), our_config, show_progress_bar=False)
    assert found.keys() == expected.keys() and "model.layers.0.self_attn.q_proj" in found
    for key in expected:
        assert torch.equal(found[key], expected[key]), key


def test_twenty_or_more_targets_are_saved_as_peft_s_shortest_suffixes():
    theirs, ours = eva_pair(three_layer_llama, {"rho": 1.0, "tau": 0.5})
    expected = theirs.peft_config["default"].target_modules
    assert len(expected) < 21 and set(ours.peft_config["default"].target_modules) == set(expected)


def test_saved_adapter_equals_peft_s_files_and_loads_both_ways_with_equal_logits(
    llama_factory, input_ids, tmp_path
):
    theirs, ours = eva_pair(llama_factory)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, Linear):
                module.lora_B["default"].weight.normal_(std=0.1)  # a trained-looking adapter
    theirs.load_state_dict(ours.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_file = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours_file == their_file and ours_file["rank_pattern"]
    loaded_by_peft = peft.PeftModel.from_pretrained(llama_factory(), tmp_path / "ours")
    loaded_by_us = lora_engine.PeftModel.from_pretrained(llama_factory(), tmp_path / "theirs")
    with torch.no_grad():
        expected = ours(input_ids).logits
        torch.testing.assert_close(loaded_by_peft(input_ids).logits, expected)
        torch.testing.assert_close(loaded_by_us(input_ids).logits, expected)


def test_rank_zero_removes_the_layer_s_adapter_like_peft(llama_factory, input_ids, tmp_path):
    model = lora_engine.get_peft_model(
        llama_factory(),
        lora_engine.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva"),
    )
    state = get_eva_state_dict(model, batches(), show_progress_bar=False)
    removed = "base_model.model.model.layers.0.self_attn.q_proj"
    state[removed] = state[removed][:0]
    initialize_lora_eva_weights(model, eva_state_dict=state)
    assert not isinstance(model.get_submodule(removed), LoraLayer)
    assert "model.layers.0.self_attn.q_proj" not in model.peft_config["default"].target_modules
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama_factory(), tmp_path)
    assert not isinstance(loaded.get_submodule(removed), peft.tuners.lora.LoraLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


def test_adjusted_scaling_keeps_every_layer_s_scaling(llama_factory):
    model = lora_engine.get_peft_model(
        llama_factory(), lora_engine.LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights="eva")
    )
    before = {name: layer.scaling["default"] for name, layer in model.base_model.lora_layers()}
    initialize_lora_eva_weights(model, batches(), show_progress_bar=False)
    assert model.peft_config["default"].rank_pattern  # ranks moved, and the scalings did not
    assert {name: layer.scaling["default"] for name, layer in model.base_model.lora_layers()} == before


def test_new_adapters_are_trainable_and_the_model_output_is_unchanged(llama_factory, input_ids):
    model = lora_engine.get_peft_model(
        llama_factory(), lora_engine.LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights="eva")
    )
    initialize_lora_eva_weights(model, batches(), show_progress_bar=False)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * len(list(model.base_model.lora_layers()))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, llama_factory()(input_ids).logits)


def test_layers_eva_cannot_initialise_get_the_default_init_with_peft_s_warning(llama_factory):
    model = lora_engine.get_peft_model(
        llama_factory(),
        lora_engine.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights="eva"),
    )
    with pytest.warns(UserWarning, match="not found in the eva state_dict: \\['model.embed_tokens'\\]"):
        initialize_lora_eva_weights(model, batches(), show_progress_bar=False)
    assert "model.embed_tokens" in model.peft_config["default"].target_modules


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda model: initialize_lora_eva_weights(model), "dataloader is required"),
        (lambda model: initialize_lora_eva_weights(model, []), "dataloader is empty"),
        (
            lambda model: get_eva_state_dict(
                model, batches(), prepare_layer_inputs_fn={"nope": lambda *a: a[0]}
            ),
            "not found in the model: \\['nope'\\]",
        ),
        (lambda model: initialize_lora_eva_weights(torch.nn.Linear(2, 2), batches()), "must be a PeftModel"),
        (lambda model: get_eva_state_dict(torch.nn.Linear(2, 2), batches()), "peft_config is required"),
    ],
)
def test_bad_calls_are_refused_like_peft(llama_factory, call, message):
    model = lora_engine.get_peft_model(
        llama_factory(), lora_engine.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva")
    )
    with pytest.raises(ValueError, match=message):
        call(model)


def test_an_adapter_not_made_for_eva_is_refused(llama_factory):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only be used with `init_lora_weights='eva'`"):
        initialize_lora_eva_weights(model, batches())


@pytest.mark.parametrize(("field", "value"), [("rho", 0.5), ("tau", -0.1), ("tau", 1.1)])
def test_eva_config_range_checks_are_peft_s(field, value):
    message = "`rho` must be >= 1.0" if field == "rho" else "`tau` must be between 0.0 and 1.0."
    with pytest.raises(ValueError, match=message.replace(".", "\\.")):
        peft.EvaConfig(**{field: value})
    with pytest.raises(ValueError, match=message.replace(".", "\\.")):
        EvaConfig(**{field: value})


def test_eva_init_without_eva_config_gets_the_default_with_peft_s_warning():
    with pytest.warns(UserWarning, match="`eva_config` is not specified. Using default EVA config."):
        config = lora_engine.LoraConfig(init_lora_weights="eva")
    with pytest.warns(UserWarning):
        expected = peft.LoraConfig(init_lora_weights="eva")
    assert config.to_dict()["eva_config"] == expected.to_dict()["eva_config"]


def test_eva_config_without_eva_init_is_kept_with_peft_s_warning():
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        config = lora_engine.LoraConfig(init_lora_weights=True, eva_config=EvaConfig(rho=3.0))
    assert config.eva_config == EvaConfig(rho=3.0)


def test_eva_config_read_back_from_a_file_is_an_eva_config(tmp_path):
    config = lora_engine.LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, whiten=True))
    config.save_pretrained(tmp_path)
    assert lora_engine.LoraConfig.from_pretrained(tmp_path).eva_config == EvaConfig(rho=1.5, whiten=True)
    assert peft.LoraConfig.from_pretrained(tmp_path).eva_config == peft.EvaConfig(rho=1.5, whiten=True)


def test_layers_sharing_an_input_are_whitened_once_where_peft_whitens_once_per_layer(llama_factory):
    # q, k and v see the same input, so one SVD serves all three. peft divides that SVD's components by √S in
    # place once for each of them (q, k and v all end up divided by S^{3/2}); whitening means dividing once.
    config = {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"], "init_lora_weights": "eva"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = get_eva_state_dict(
            llama_factory(),
            batches(),
            lora_engine.LoraConfig(**config, eva_config=EvaConfig(rho=1.0, tau=0.9)),
        )
        whitened = get_eva_state_dict(
            llama_factory(),
            batches(),
            lora_engine.LoraConfig(**config, eva_config=EvaConfig(rho=1.0, tau=0.9, whiten=True)),
        )
        theirs = peft_get_eva_state_dict(
            llama_factory(),
            batches(),
            peft.LoraConfig(**config, eva_config=peft.EvaConfig(rho=1.0, tau=0.9, whiten=True)),
            show_progress_bar=False,
        )
    q, k, v = (f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(whitened[q], whitened[k]) and torch.equal(whitened[q], whitened[v])
    sqrt_singular = (plain[q].norm(dim=1) / whitened[q].norm(dim=1))[:, None]
    torch.testing.assert_close(whitened[q] * sqrt_singular, plain[q])
    torch.testing.assert_close(theirs[q], whitened[q] / sqrt_singular**2)


def test_dora_adapters_with_redistributed_ranks_equal_peft(llama_factory, input_ids):
    theirs, ours = eva_pair(llama_factory, use_dora=True)
    assert_same_adapters(theirs, ours)  # magnitudes included
    trainable = sorted(name for name, param in ours.named_parameters() if param.requires_grad)
    assert trainable == sorted(name for name, param in theirs.named_parameters() if param.requires_grad)
    with torch.no_grad():
        for model in (theirs, ours):
            for module in model.modules():
                if isinstance(module, (Linear, peft.tuners.lora.Linear)):
                    module.lora_B["default"].weight.fill_(0.01)
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits)


def test_4bit_base_layers_get_the_components_and_ranks_peft_gives_them(load):  # noqa: F811
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": "eva"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(), peft.LoraConfig(**config, eva_config=peft.EvaConfig(tau=0.9)))
        peft_initialize_lora_eva_weights(theirs, batches(), show_progress_bar=False)
        ours = lora_engine.get_peft_model(
            load(), lora_engine.LoraConfig(**config, eva_config=EvaConfig(tau=0.9))
        )
        initialize_lora_eva_weights(ours, batches(), show_progress_bar=False)
    assert_same_adapters(theirs, ours)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern


def test_gpt2_conv1d_layers_equal_peft(gpt2_factory):
    config = {
        "r": 4,
        "target_modules": ["c_attn", "c_fc"],
        "init_lora_weights": "eva",
        "fan_in_fan_out": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            gpt2_factory(), peft.LoraConfig(**config, eva_config=peft.EvaConfig(tau=0.9))
        )
        peft_initialize_lora_eva_weights(theirs, batches(), show_progress_bar=False)
        ours = lora_engine.get_peft_model(
            gpt2_factory(), lora_engine.LoraConfig(**config, eva_config=EvaConfig(tau=0.9))
        )
        initialize_lora_eva_weights(ours, batches(), show_progress_bar=False)
    assert_same_adapters(theirs, ours)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern


def test_a_targeted_layer_the_data_never_reaches_is_named_instead_of_waiting_forever(llama_factory):
    model = lora_engine.get_peft_model(
        llama_factory(),
        lora_engine.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights="eva"),
    )
    with pytest.raises(ValueError, match="layers \\['base_model.model.lm_head'\\] got no input"):
        initialize_lora_eva_weights(
            model, batches(), forward_fn=lambda model, batch: model.base_model.model.model(batch["input_ids"])
        )
