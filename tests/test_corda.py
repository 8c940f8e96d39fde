"""CorDA (``init_lora_weights="corda"``), peft 0.21.2 as the oracle: ``preprocess_corda`` on a tiny Llama and an
in-memory calibration set, then ``get_peft_model``: factors and rewritten base weights equal peft's, in both
modes, from the data, from the cache file and from the covariance file; files are never unpickled."""

import copy
import json
import pickle
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from safetensors.torch import load_file

import lora_engine
from lora_engine import CordaConfig, preprocess_corda

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny forwards: torch's thread pool only adds contention at these sizes on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, 48), generator=generator) for _ in range(count)]


def run_on(model, samples=None):
    return lambda: [model(sample) for sample in samples or calibration()]


def configs(method="ipm", **corda):
    """(peft's LoraConfig, ours) for CorDA with the same fields."""
    fields = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "corda"}
    their_corda = {key: value for key, value in corda.items() if key != "rank_pattern"}
    extra = {"rank_pattern": corda["rank_pattern"]} if "rank_pattern" in corda else {}
    theirs = peft.LoraConfig(
        **fields, **extra, corda_config=PeftCordaConfig(corda_method=method, **their_corda)
    )
    ours = lora_engine.LoraConfig(
        **fields, **extra, corda_config=CordaConfig(corda_method=method, **their_corda)
    )
    return theirs, ours


def peft_corda_model(make, method="ipm", **corda):
    base = make()
    config = configs(method, **corda)[0]
    peft_preprocess_corda(base, config, run_model=run_on(base))
    return peft.get_peft_model(base, config)


def assert_same_tensors(theirs, ours):
    expected, found = theirs.state_dict(), ours.state_dict()
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_factors_and_residual_base_weights_equal_peft(llama_factory, method):
    base = llama_factory()
    config = configs(method)[1]
    preprocess_corda(base, config, run_model=run_on(base))
    ours = lora_engine.get_peft_model(base, config)
    assert_same_tensors(peft_corda_model(llama_factory, method), ours)
    assert not torch.equal(
        ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
        llama_factory().model.layers[0].self_attn.q_proj.weight,
    )


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_model_output_is_unchanged_at_the_start(llama_factory, input_ids, method):
    base = llama_factory()
    config = configs(method)[1]
    preprocess_corda(base, config, run_model=run_on(base))
    with torch.no_grad():
        torch.testing.assert_close(
            lora_engine.get_peft_model(base, config)(input_ids).logits, llama_factory()(input_ids).logits
        )


def test_rank_pattern_sets_each_layer_s_rank_like_peft(llama_factory):
    pattern = {"down_proj": 2}
    base = llama_factory()
    config = configs("ipm", rank_pattern=pattern)[1]
    preprocess_corda(base, config, run_model=run_on(base))
    ours = lora_engine.get_peft_model(base, config)
    assert_same_tensors(peft_corda_model(llama_factory, "ipm", rank_pattern=pattern), ours)
    assert ours.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape[0] == 2


def test_gpt2_conv1d_equals_peft(gpt2_factory):
    fields = {"r": 4, "target_modules": ["c_fc"], "init_lora_weights": "corda", "fan_in_fan_out": True}
    theirs_base, ours_base = gpt2_factory(), gpt2_factory()
    their_config = peft.LoraConfig(**fields, corda_config=PeftCordaConfig())
    our_config = lora_engine.LoraConfig(**fields, corda_config=CordaConfig())
    peft_preprocess_corda(theirs_base, their_config, run_model=run_on(theirs_base))
    preprocess_corda(ours_base, our_config, run_model=run_on(ours_base))
    assert_same_tensors(
        peft.get_peft_model(theirs_base, their_config), lora_engine.get_peft_model(ours_base, our_config)
    )


def test_cache_file_is_safetensors_and_rebuilds_the_same_adapter_without_data(llama_factory, tmp_path):
    cache = tmp_path / "corda" / "cache.safetensors"
    base = llama_factory()
    config = configs("kpm", cache_file=cache)[1]
    preprocess_corda(base, config, run_model=run_on(base))
    first = lora_engine.get_peft_model(base, config)
    assert "model.layers.0.self_attn.q_proj.eigens.V_WC" in load_file(cache)
    again = llama_factory()
    preprocess_corda(again, configs("kpm", cache_file=cache)[1])  # no run_model: read from the cache
    assert_same_tensors(first, lora_engine.get_peft_model(again, configs("kpm", cache_file=cache)[1]))


def test_covariance_file_serves_another_rank_like_peft(llama_factory, tmp_path):
    covariance = tmp_path / "covariance.safetensors"
    base = llama_factory()
    preprocess_corda(base, configs("ipm", covariance_file=covariance)[1], run_model=run_on(base))
    other_rank = llama_factory()
    config = configs("ipm", covariance_file=covariance, rank_pattern={"q_proj": 2})[1]
    preprocess_corda(other_rank, config)
    expected = peft_corda_model(llama_factory, "ipm", rank_pattern={"q_proj": 2})
    assert_same_tensors(expected, lora_engine.get_peft_model(other_rank, config))


def test_cache_file_written_by_peft_loads_with_equal_factors(llama_factory, tmp_path):
    cache = tmp_path / "peft_cache.pt"
    their_base = llama_factory()
    their_config = configs("ipm", cache_file=str(cache))[0]
    peft_preprocess_corda(their_base, their_config, run_model=run_on(their_base))
    theirs = peft.get_peft_model(their_base, their_config)
    ours_base = llama_factory()
    our_config = configs("ipm", cache_file=cache)[1]
    preprocess_corda(ours_base, our_config)
    assert_same_tensors(theirs, lora_engine.get_peft_model(ours_base, our_config))


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_cache_file_holding_a_pickled_object_is_refused_without_running_it(llama_factory, tmp_path):
    cache = tmp_path / "cache.pt"
    with open(cache, "wb") as file:
        pickle.dump({"model.layers.0.self_attn.q_proj.eigens.S_WC": _RunsCodeWhenUnpickled()}, file)
    with pytest.raises(ValueError, match="neither a safetensors file nor a torch.save file of tensors"):
        preprocess_corda(llama_factory(), configs("ipm", cache_file=cache)[1])
    assert UNPICKLED == []
    pickle.loads(cache.read_bytes())  # control: plain unpickling would have run it
    assert UNPICKLED == [True]


def test_a_cache_built_for_other_targets_names_the_missing_tensor(llama_factory, tmp_path):
    cache = tmp_path / "cache.safetensors"
    base = llama_factory()
    preprocess_corda(base, configs("ipm", cache_file=cache)[1], run_model=run_on(base))
    config = lora_engine.LoraConfig(
        target_modules=["k_proj"], init_lora_weights="corda", corda_config=CordaConfig(cache_file=cache)
    )
    with pytest.raises(ValueError, match="has no tensor 'model.layers.0.self_attn.k_proj.eigens.S_WC'"):
        preprocess_corda(llama_factory(), config)


def test_hooked_model_statistics_go_to_the_model_by_name_like_peft(llama_factory):
    their_base, their_hooked = llama_factory(), llama_factory()
    their_config = configs("ipm")[0]
    peft_preprocess_corda(their_base, their_config, run_model=run_on(their_hooked), hooked_model=their_hooked)
    base, hooked = llama_factory(), llama_factory()
    config = configs("ipm")[1]
    preprocess_corda(base, config, run_model=run_on(hooked), hooked_model=hooked)
    assert_same_tensors(
        peft.get_peft_model(their_base, their_config), lora_engine.get_peft_model(base, config)
    )


def test_temporary_fields_are_pruned_and_eigens_consumed_at_injection(llama_factory):
    base = llama_factory()
    config = configs("ipm")[1]
    preprocess_corda(base, config, run_model=run_on(base))
    layer = base.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "eigens")
    assert not any(
        hasattr(layer, name) for name in ("sample_count", "covariance_matrix", "corda_method", "rank")
    )
    lora_engine.get_peft_model(base, config)
    assert not hasattr(layer, "eigens")


def test_unpruned_fields_count_one_sample_per_call(llama_factory):
    base = llama_factory()
    config = configs("ipm", prune_temporary_fields=False)[1]
    preprocess_corda(base, config, run_model=run_on(base, calibration(count=2)))
    layer = base.model.layers[1].mlp.down_proj
    assert layer.sample_count == 2 and layer.covariance_matrix.shape == (64, 64)
    assert (layer.corda_method, layer.rank) == ("ipm", 4)


def test_saved_adapter_equals_peft_s_files_and_loads_in_peft_on_the_same_preprocessed_base(
    llama_factory, input_ids, tmp_path
):
    base = llama_factory()
    config = configs("ipm")[1]
    preprocess_corda(base, config, run_model=run_on(base))
    preprocessed = copy.deepcopy(base)  # peft's load runs the CorDA init again, from the same eigens
    ours = lora_engine.get_peft_model(base, config)
    with torch.no_grad():
        ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(2.0)
    ours.save_pretrained(tmp_path)
    peft_corda_model(llama_factory).save_pretrained(tmp_path / "theirs")
    their_file = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    their_file["target_modules"].sort()  # peft writes the set in arbitrary order, lora_engine sorted
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == their_file
    loaded = peft.PeftModel.from_pretrained(preprocessed, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, ours(input_ids).logits)


def test_converted_adapter_is_plain_lora_on_the_original_base_in_peft(llama_factory, input_ids, tmp_path):
    base = llama_factory()
    config = configs("kpm")[1]
    preprocess_corda(base, config, run_model=run_on(base))
    ours = lora_engine.get_peft_model(base, config)
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(tmp_path / "initial")
    ours.peft_config["default"].init_lora_weights = "corda"
    with torch.no_grad():
        ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(2.0)
    ours.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
    )
    loaded = peft.PeftModel.from_pretrained(llama_factory(), tmp_path / "converted")
    assert loaded.peft_config["default"].r == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, ours(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_corda_without_preprocessing_is_refused_saying_what_to_run(llama_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lora_engine.LoraConfig(target_modules=["q_proj"], init_lora_weights="corda")
    with pytest.raises(ValueError, match="run `preprocess_corda` first"):
        lora_engine.get_peft_model(llama_factory(), config)


def test_preprocessing_without_data_or_files_is_refused_like_peft(llama_factory):
    with pytest.raises(ValueError, match="run_model must be specified"):
        preprocess_corda(llama_factory(), configs("ipm")[1])


def test_a_targeted_layer_that_saw_no_input_is_named(llama_factory):
    base = llama_factory()
    config = lora_engine.LoraConfig(
        target_modules=["q_proj", "lm_head"], init_lora_weights="corda", corda_config=CordaConfig()
    )
    with pytest.raises(ValueError, match="layer 'lm_head' saw no input"):
        preprocess_corda(base, config, run_model=lambda: base.model(calibration()[0]))


def test_corda_on_an_embedding_is_refused_naming_it(llama_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lora_engine.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="corda")
    with pytest.raises(
        ValueError, match="init_lora_weights='corda' on 'model.embed_tokens' .*not supported yet"
    ):
        lora_engine.get_peft_model(llama_factory(), config)


def test_corda_config_read_back_from_a_file_is_a_corda_config(tmp_path):
    config = lora_engine.LoraConfig(
        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm", cache_file=tmp_path / "c.pt")
    )
    config.save_pretrained(tmp_path)
    expected = CordaConfig(corda_method="kpm", cache_file=str(tmp_path / "c.pt"))
    assert lora_engine.LoraConfig.from_pretrained(tmp_path).corda_config == expected
    assert peft.LoraConfig.from_pretrained(tmp_path).corda_config.corda_method == "kpm"


def test_corda_init_without_corda_config_gets_the_default_with_peft_s_warning():
    with pytest.warns(UserWarning, match="`corda_config` is not specified. Using default CorDA config."):
        config = lora_engine.LoraConfig(init_lora_weights="corda")
    assert config.corda_config == CordaConfig()
    assert (
        config.to_dict()["corda_config"]
        == peft.LoraConfig(init_lora_weights="corda").to_dict()["corda_config"]
    )


def test_dora_on_a_corda_init_equals_peft(llama_factory, input_ids):
    their_base, base = llama_factory(), llama_factory()
    their_config, config = configs("ipm")
    their_config.use_dora = config.use_dora = True
    peft_preprocess_corda(their_base, their_config, run_model=run_on(their_base))
    preprocess_corda(base, config, run_model=run_on(base))
    theirs, ours = peft.get_peft_model(their_base, their_config), lora_engine.get_peft_model(base, config)
    assert_same_tensors(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits)
