"""LoftQ: ``init_lora_weights="loftq"`` with ``LoftQConfig``, and ``replace_lora_weights_loftq`` on a 4-bit base.

peft 0.21.2 is the oracle, run through ``loftq_oracle.cuda_as_cpu`` (peft's LoftQ hard-codes a CUDA compute device
and cannot run on this machine otherwise). LoftQ is deterministic (bitsandbytes' NF4/int8 round trip, then a full
SVD), so every factor and base weight must be bit-identical to peft's.
"""

import dataclasses
import json
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import VOCAB_SIZE
from loftq_oracle import cuda_as_cpu
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import lora_engine

QV = ["q_proj", "v_proj"]
LORA = {"target_modules": QV, "r": 4, "lora_alpha": 8}


def loftq_lora(library, bits=4, iters=1, **overrides):
    """``library.LoraConfig`` for LoftQ with ``library``'s own ``LoftQConfig``."""
    settings = library.LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    return library.LoraConfig(**{**LORA, "init_lora_weights": "loftq", "loftq_config": settings, **overrides})


def build_pair(make, bits=4, iters=1, dtype=torch.float32, **overrides):
    with cuda_as_cpu():
        theirs = peft.get_peft_model(make(dtype=dtype), loftq_lora(peft, bits, iters, **overrides))
    ours = lora_engine.get_peft_model(make(dtype=dtype), loftq_lora(lora_engine, bits, iters, **overrides))
    return theirs, ours


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_states_equal(ours, theirs, keys=None):
    their_state = theirs.state_dict()
    our_state = ours.state_dict()
    assert our_state.keys() == their_state.keys()
    for key in keys or our_state:
        assert torch.equal(our_state[key], their_state[key]), key


# ---------------------------------------------------------------------------------------------------------- config
def test_loftq_config_has_peft_fields_and_defaults():
    def described(config_class):
        return [(field.name, field.default) for field in dataclasses.fields(config_class)]

    assert described(lora_engine.LoftQConfig) == described(peft.LoftQConfig)


def test_loftq_names_are_where_peft_has_them():
    from lora_engine.tuners.lora import LoftQConfig
    from lora_engine.utils import replace_lora_weights_loftq

    assert LoftQConfig is lora_engine.LoftQConfig
    assert replace_lora_weights_loftq is lora_engine.replace_lora_weights_loftq


def test_loftq_init_without_loftq_config_is_refused_like_peft():
    message = "`loftq_config` must be specified when `init_lora_weights` is 'loftq'."
    with pytest.raises(ValueError, match=message):
        peft.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match=message):
        lora_engine.LoraConfig(init_lora_weights="loftq")


def test_loftq_config_with_another_init_is_dropped_with_peft_warning():
    configs = []
    for library in (peft, lora_engine):
        with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored") as caught:
            configs.append(library.LoraConfig(loftq_config=library.LoftQConfig()))
        assert len(caught) == 1
    assert configs[0].loftq_config == configs[1].loftq_config == {}


def test_loftq_config_is_stored_as_peft_stores_it():
    assert loftq_lora(lora_engine, 8, 3).loftq_config == loftq_lora(peft, 8, 3).loftq_config


def test_partial_loftq_config_dict_takes_the_defaults():
    # peft stores {"loftq_bits": 8} as given and then fails with KeyError('loftq_iter') when creating the adapter.
    config = lora_engine.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 1}


@pytest.mark.parametrize(
    ("loftq_config", "named"),
    [
        ({"loftq_bits": 3}, "loftq_bits=3: only nf4 and int8"),
        ({"loftq_bits": True}, "loftq_bits=True"),
        ({"loftq_iter": 0}, "loftq_iter=0: the number of iterations must be an int greater than 0"),
        ({"loftq_iter": 1.5}, "loftq_iter=1.5"),
        ({"loftq_bit": 4}, r"keys \['loftq_bit'\] that are not LoftQConfig fields"),
        ([4, 1], r"loftq_config=\[4, 1\] must be a LoftQConfig or a dict"),
    ],
    ids=["bits_3", "bits_bool", "iter_0", "iter_float", "unknown_key", "a_list"],
)
def test_invalid_loftq_config_is_refused_naming_the_value(loftq_config, named):
    with pytest.raises(ValueError, match=named):
        lora_engine.LoraConfig(init_lora_weights="loftq", loftq_config=loftq_config)


def test_saved_adapter_config_equals_peft(llama_factory, tmp_path):
    theirs, ours = build_pair(llama_factory, bits=8, iters=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for config in (their_config, our_config):  # peft writes the set in its iteration order, we sort it
        config["target_modules"] = set(config["target_modules"])
    assert our_config == their_config


# ------------------------------------------------------------------------------------------- init_lora_weights="loftq"
@pytest.mark.parametrize(
    ("bits", "iters", "dtype"),
    [(4, 1, torch.float32), (4, 3, torch.float32), (8, 2, torch.float32), (4, 2, torch.bfloat16)],
    ids=["nf4", "nf4_3_iterations", "int8_2_iterations", "nf4_bf16_base"],
)
def test_loftq_factors_and_base_weights_equal_peft_exactly(llama_factory, bits, iters, dtype):
    theirs, ours = build_pair(llama_factory, bits, iters, dtype)
    assert_states_equal(
        ours, theirs
    )  # the factors, and the base weights replaced by their quantized round trip


def test_loftq_base_weight_is_its_own_nf4_round_trip(llama_factory):
    original = llama_factory().model.layers[0].self_attn.q_proj.weight
    _, ours = build_pair(llama_factory)
    packed, quant_state = bnb.functional.quantize_4bit(original, quant_type="nf4", compress_statistics=False)
    expected = bnb.functional.dequantize_4bit(packed, quant_state)
    assert torch.equal(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, expected)


def test_loftq_logits_equal_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, iters=2)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_loftq_brings_the_quantized_model_closer_to_the_original(llama_factory, input_ids):
    # peft's own LoftQ tests check this: the error to the unquantized model falls below plain quantization's.
    _, ours = build_pair(llama_factory, iters=2, r=8, lora_alpha=8)
    expected = logits(llama_factory(), input_ids)
    with ours.disable_adapter():
        quantized_only_error = (logits(ours, input_ids) - expected).abs().mean()
    loftq_error = (logits(ours, input_ids) - expected).abs().mean()
    assert loftq_error < 0.5 * quantized_only_error


def test_loftq_with_dora_equals_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, use_dora=True)
    assert_states_equal(ours, theirs)


def test_saved_loftq_adapter_loads_in_peft_with_equal_logits(llama_factory, input_ids, tmp_path):
    _, ours = build_pair(llama_factory, iters=2)
    ours.save_pretrained(tmp_path)
    with cuda_as_cpu():  # peft runs the LoftQ init again on load, to quantize the base
        theirs = peft.PeftModel.from_pretrained(llama_factory(), tmp_path)
    assert_states_equal(ours, theirs)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_peft_loftq_adapter_loads_with_equal_logits(llama_factory, input_ids, tmp_path):
    theirs, _ = build_pair(llama_factory, bits=8)
    theirs.save_pretrained(tmp_path)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory(), tmp_path)
    assert_states_equal(ours, theirs)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_loftq_on_an_embedding_is_refused_naming_it(llama_factory):
    # peft 0.21.2 fails here with TypeError: Embedding.loftq_init() is called without its config argument.
    config = loftq_lora(lora_engine, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match=r"init_lora_weights='loftq' on 'model.embed_tokens' \(Embedding\)"):
        lora_engine.get_peft_model(llama_factory(), config)


def test_loftq_on_a_gpt2_conv1d_is_refused_naming_it(gpt2_factory):
    config = loftq_lora(lora_engine, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ValueError, match="init_lora_weights='loftq' on a transformers Conv1D"):
        lora_engine.get_peft_model(gpt2_factory(), config)


# ------------------------------------------------------------------------------------- replace_lora_weights_loftq
def load_4bit(folder):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    for (
        module
    ) in model.modules():  # keep bnb's portable layout, which peft's dequantize reads (see test_qlora)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def qlora_pair(folder):
    config = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}
    theirs_base, ours_base = load_4bit(folder), load_4bit(folder)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**config))
    torch.manual_seed(0)
    ours = lora_engine.get_peft_model(ours_base, lora_engine.LoraConfig(**config))
    return theirs, ours


def ours_4bit(folder, **config):
    config = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, **config}
    return lora_engine.get_peft_model(load_4bit(folder), lora_engine.LoraConfig(**config))


def lora_keys(model):
    return [key for key in model.state_dict() if ".lora_" in key]


def test_replace_lora_weights_loftq_equals_peft(tiny_llama_4bit_folder):
    theirs, ours = qlora_pair(tiny_llama_4bit_folder)
    with cuda_as_cpu():
        peft.replace_lora_weights_loftq(theirs, model_path=str(tiny_llama_4bit_folder))
    lora_engine.replace_lora_weights_loftq(ours, model_path=tiny_llama_4bit_folder)
    assert_states_equal(ours, theirs, keys=lora_keys(ours))


def test_replace_lora_weights_loftq_brings_the_model_closer_to_the_original(tiny_llama_4bit_folder):
    tokens = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(LlamaForCausalLM.from_pretrained(tiny_llama_4bit_folder).eval(), tokens)
    ours = ours_4bit(
        tiny_llama_4bit_folder, lora_alpha=4
    )  # scaling 1: LoftQ's B A is the error itself, unscaled
    quantized_only_error = (logits(ours, tokens) - expected).abs().mean()
    lora_engine.replace_lora_weights_loftq(ours, model_path=tiny_llama_4bit_folder)
    loftq_error = (logits(ours, tokens) - expected).abs().mean()
    assert loftq_error < quantized_only_error  # rank 4 of 64: the quantization noise is nearly full rank


def test_replace_lora_weights_loftq_callback_sees_peft_names_and_can_roll_back(tiny_llama_4bit_folder):
    theirs, ours = qlora_pair(tiny_llama_4bit_folder)
    kept = "model.layers.0.self_attn.q_proj"
    seen = {"peft": [], "ours": []}

    def keep_one(library):
        def callback(model, name):
            seen[library].append(name)
            return name == kept

        return callback

    before = {key: value.clone() for key, value in ours.state_dict().items() if ".lora_" in key}
    with cuda_as_cpu():
        peft.replace_lora_weights_loftq(
            theirs, model_path=str(tiny_llama_4bit_folder), callback=keep_one("peft")
        )
    lora_engine.replace_lora_weights_loftq(ours, model_path=tiny_llama_4bit_folder, callback=keep_one("ours"))
    assert seen["ours"] == seen["peft"] and kept in seen["ours"]
    after = ours.state_dict()
    changed = sorted(key for key in before if not torch.equal(after[key], before[key]))
    assert changed == [f"base_model.model.{kept}.lora_{factor}.default.weight" for factor in "AB"]
    assert_states_equal(ours, theirs, keys=lora_keys(ours))


def test_replace_lora_weights_loftq_reads_a_sharded_checkpoint(tiny_llama_4bit_folder, tmp_path):
    LlamaForCausalLM.from_pretrained(tiny_llama_4bit_folder).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    from_one_file, from_shards = ours_4bit(tiny_llama_4bit_folder), ours_4bit(tiny_llama_4bit_folder)
    lora_engine.replace_lora_weights_loftq(from_one_file, model_path=tiny_llama_4bit_folder)
    lora_engine.replace_lora_weights_loftq(from_shards, model_path=tmp_path)
    assert_states_equal(from_shards, from_one_file, keys=lora_keys(from_one_file))


def test_replace_lora_weights_loftq_reads_a_file_of_the_bare_base_model(tiny_llama_4bit_folder, tmp_path):
    # A LlamaModel file has no "model." in its keys; the base model prefix is stripped, as in peft.
    LlamaForCausalLM.from_pretrained(tiny_llama_4bit_folder).model.save_pretrained(tmp_path)
    # The file has no lm_head, so both models adapt the decoder layers only.
    from_full, from_bare = (
        ours_4bit(tiny_llama_4bit_folder, target_modules=QV),
        ours_4bit(tiny_llama_4bit_folder, target_modules=QV),
    )
    lora_engine.replace_lora_weights_loftq(from_full, model_path=tiny_llama_4bit_folder / "model.safetensors")
    lora_engine.replace_lora_weights_loftq(from_bare, model_path=tmp_path)
    for key in lora_keys(from_bare):
        assert torch.equal(from_bare.state_dict()[key], from_full.state_dict()[key]), key


def test_replace_lora_weights_loftq_finds_the_folder_the_base_was_loaded_from(tiny_llama_4bit_folder):
    # peft 0.21.2 looks only in the Hugging Face cache and refuses a model loaded from a local folder.
    explicit, implicit = ours_4bit(tiny_llama_4bit_folder), ours_4bit(tiny_llama_4bit_folder)
    lora_engine.replace_lora_weights_loftq(explicit, model_path=tiny_llama_4bit_folder)
    lora_engine.replace_lora_weights_loftq(implicit)
    assert_states_equal(implicit, explicit, keys=lora_keys(explicit))


def test_replace_lora_weights_loftq_without_a_4bit_layer_is_refused(llama_factory, tiny_llama_4bit_folder):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**LORA))
    with pytest.raises(ValueError, match="No bnb LoRA module found on the model"):
        lora_engine.replace_lora_weights_loftq(model, model_path=tiny_llama_4bit_folder)


def test_replace_lora_weights_loftq_names_a_missing_file(tiny_llama_4bit_folder, tmp_path):
    ours = ours_4bit(tiny_llama_4bit_folder)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*model.safetensors"):
        lora_engine.replace_lora_weights_loftq(ours, model_path=tmp_path)


def test_replace_lora_weights_loftq_names_an_unknown_adapter(tiny_llama_4bit_folder):
    ours = ours_4bit(tiny_llama_4bit_folder)
    with pytest.raises(ValueError, match="has no adapter 'other'; its adapters are \\['default'\\]"):
        lora_engine.replace_lora_weights_loftq(ours, model_path=tiny_llama_4bit_folder, adapter_name="other")


def test_loftq_init_on_a_4bit_base_is_refused_naming_the_module(tiny_llama_4bit_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_4bit(tiny_llama_4bit_folder)
    with pytest.raises(ValueError, match=r"init_lora_weights='loftq' on 'model.layers.0.self_attn.q_proj'"):
        lora_engine.get_peft_model(model, loftq_lora(lora_engine))
