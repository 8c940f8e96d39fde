"""The weight-derived inits ("pissa", "pissa_niter_K", "olora", "orthogonal") with peft 0.21.2 as the oracle, and
the conversion of a PiSSA/OLoRA adapter to plain LoRA at save time (``path_initial_model_for_weight_conversion``).

Both libraries build their adapters from identical bases; the random inits draw from torch's global generator,
seeded identically before each library's call, so every factor must be bit-identical to peft's.
"""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_engine

QV = ["q_proj", "v_proj"]


def build_pair(make, init, seed=0, **config):
    config = {"target_modules": QV, "r": 4, "lora_alpha": 8, "init_lora_weights": init, **config}
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**config))
    torch.manual_seed(seed)
    ours = lora_engine.get_peft_model(make(), lora_engine.LoraConfig(**config))
    return theirs, ours


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturb_factors(model, seed=7) -> None:
    """A stand-in for training: the same seeded change to every LoRA factor of either library's model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal"])
def test_init_factors_and_base_weights_equal_peft_exactly(llama_factory, init):
    theirs, ours = build_pair(llama_factory, init)
    their_state = theirs.state_dict()
    assert ours.state_dict().keys() == their_state.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, their_state[key]), key  # factors, and the residual base weights


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_that_rewrites_the_base_leaves_the_model_output_unchanged(llama_factory, input_ids, init):
    _, ours = build_pair(llama_factory, init)
    torch.testing.assert_close(
        logits(ours, input_ids), logits(llama_factory(), input_ids), atol=1e-5, rtol=1e-4
    )


def test_pissa_on_gpt2_conv1d_equals_peft(gpt2_factory):
    theirs, ours = build_pair(gpt2_factory, "pissa", target_modules=["c_attn"], fan_in_fan_out=True)
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, their_state[key]), key


def test_orthogonal_init_with_an_odd_rank_is_refused_like_peft(llama_factory):
    with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3"):
        build_pair(llama_factory, "orthogonal", r=3)


def test_weight_derived_init_on_an_embedding_is_refused_naming_it(llama_factory):
    config = lora_engine.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' on 'model.embed_tokens' \(Embedding\)"):
        lora_engine.get_peft_model(llama_factory(), config)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_equals_peft_and_reproduces_the_trained_model_on_the_original_base(
    llama_factory, input_ids, tmp_path, init
):
    theirs, ours = build_pair(llama_factory, init)
    theirs.save_pretrained(tmp_path / "peft_init")
    ours.save_pretrained(tmp_path / "ours_init")
    perturb_factors(theirs)
    perturb_factors(ours)
    theirs.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
    )
    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init")
    )

    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == their_file.keys()
    for key, value in our_file.items():
        assert torch.equal(value, their_file[key]), key
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights"):
        assert our_config[field] == their_config[field], field
    assert set(ours.peft_config) == {"default"}  # the temporary initial adapter is gone

    converted = lora_engine.PeftModel.from_pretrained(llama_factory(), tmp_path / "ours")
    torch.testing.assert_close(logits(converted, input_ids), logits(ours, input_ids), atol=1e-5, rtol=1e-4)
