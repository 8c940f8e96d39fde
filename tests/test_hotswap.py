"""Hot-swapping adapters (lora_engine.utils.hotswap): the swapped model computes what a fresh load of the new
adapter computes, and a torch.compile-d model runs the swapped adapter without compiling again. Compiles are
counted with torch._dynamo's CompileCounter backend (one count per compiled frame)."""

import peft
import pytest
import torch
from conftest import tiny_llama_config
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare
from torch._dynamo.testing import CompileCounter
from transformers import LlamaForCausalLM

import lora_engine
from lora_engine.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


@pytest.fixture
def llama_factory():
    """conftest's tiny Llama with one decoder layer: compiling it is what these tests time."""

    def make(seed: int = 0):
        config = tiny_llama_config()
        config.num_hidden_layers = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def save_adapter(llama_factory, folder, seed, **config):
    """A non-trivial adapter (random A and B) saved to ``folder``."""
    torch.manual_seed(seed)
    config = {"target_modules": TARGETS, "init_lora_weights": False, **config}
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**config))
    model.save_pretrained(folder)
    return folder


def load(llama_factory, folder):
    return lora_engine.PeftModel.from_pretrained(llama_factory(), folder)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_swapped_model_equals_a_fresh_load_of_the_new_adapter(llama_factory, tmp_path, input_ids):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    second = save_adapter(llama_factory, tmp_path / "b", seed=2, lora_alpha=32)
    model = load(llama_factory, first)
    before = logits(model, input_ids)
    hotswap_adapter(model, str(second), adapter_name="default")
    expected = logits(load(llama_factory, second), input_ids)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)


def test_swap_keeps_the_parameter_objects(llama_factory, tmp_path):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    second = save_adapter(llama_factory, tmp_path / "b", seed=2)
    model = load(llama_factory, first)
    before = {name: param for name, param in model.named_parameters() if "lora_" in name}
    hotswap_adapter(model, str(second), adapter_name="default")
    after = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_swapped_model_equals_peft_after_the_same_swap(llama_factory, tmp_path, input_ids):
    # No embedding target: peft's hotswap fails on the full embedding weight saved with an embedding adapter.
    first = save_adapter(llama_factory, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    second = save_adapter(
        llama_factory, tmp_path / "b", seed=2, target_modules=["q_proj", "v_proj"], lora_alpha=16
    )
    ours = load(llama_factory, first)
    theirs = peft.PeftModel.from_pretrained(llama_factory(), first)
    hotswap_adapter(ours, str(second), adapter_name="default")
    peft_hotswap_adapter(theirs, str(second), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=0, atol=0)


def test_compiled_model_runs_a_swapped_adapter_of_another_alpha_without_recompiling(
    llama_factory, tmp_path, input_ids
):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1, lora_alpha=8)
    second = save_adapter(llama_factory, tmp_path / "b", seed=2, lora_alpha=24)
    model = load(llama_factory, first)
    prepare_model_for_compiled_hotswap(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    logits(compiled, input_ids)
    compiles = counter.frame_count
    hotswap_adapter(compiled, str(second), adapter_name="default")
    swapped = logits(compiled, input_ids)
    assert counter.frame_count == compiles
    torch.testing.assert_close(swapped, logits(load(llama_factory, second), input_ids), rtol=1e-6, atol=1e-6)


def test_compiled_model_runs_a_smaller_and_a_larger_rank_after_padding_without_recompiling(
    llama_factory, tmp_path, input_ids
):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1, r=4)
    smaller = save_adapter(llama_factory, tmp_path / "b", seed=2, r=2, lora_alpha=4)
    larger = save_adapter(llama_factory, tmp_path / "c", seed=3, r=8, lora_alpha=16)
    model = load(llama_factory, first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    logits(compiled, input_ids)
    compiles = counter.frame_count
    for folder in (smaller, larger, first):
        hotswap_adapter(compiled, str(folder), adapter_name="default")
        expected = logits(load(llama_factory, folder), input_ids)
        torch.testing.assert_close(logits(compiled, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == compiles


def test_without_tensor_scalings_a_new_alpha_recompiles(llama_factory, tmp_path, input_ids):
    # Why prepare_model_for_compiled_hotswap exists: a float scaling is a constant of the compiled graph.
    first = save_adapter(llama_factory, tmp_path / "a", seed=1, lora_alpha=8)
    second = save_adapter(llama_factory, tmp_path / "b", seed=2, lora_alpha=24)
    counter = CompileCounter()
    compiled = torch.compile(load(llama_factory, first), backend=counter)
    logits(compiled, input_ids)
    compiles = counter.frame_count
    hotswap_adapter(compiled, str(second), adapter_name="default")
    logits(compiled, input_ids)
    assert counter.frame_count > compiles


def test_padding_keeps_outputs(llama_factory, tmp_path, input_ids):
    model = load(llama_factory, save_adapter(llama_factory, tmp_path / "a", seed=1, r=4))
    before = logits(model, input_ids)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=1e-6, atol=1e-6)
    # peft pads only linear layers; we pad embedding adapters too, so that their rank can change as well.
    embedding = model.base_model.model.model.embed_tokens
    assert embedding.lora_embedding_A["default"].shape == (8, embedding.in_features)


def test_padded_linear_factors_equal_peft(llama_factory, tmp_path):
    folder = save_adapter(llama_factory, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    ours = load(llama_factory, folder)
    theirs = peft.PeftModel.from_pretrained(llama_factory(), folder)
    prepare_model_for_compiled_hotswap(ours, target_rank=8, config=ours.peft_config)
    peft_prepare(theirs, target_rank=8, config=theirs.peft_config)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert ours.peft_config["default"].r == 8


def test_padding_below_an_adapter_rank_raises_naming_the_module(llama_factory, tmp_path):
    model = load(llama_factory, save_adapter(llama_factory, tmp_path / "a", seed=1, r=4))
    with pytest.raises(ValueError, match="target rank 2, but its rank is larger \\(4\\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)


def test_prepare_on_a_compiled_model_raises(llama_factory, tmp_path):
    model = load(llama_factory, save_adapter(llama_factory, tmp_path / "a", seed=1))
    with pytest.raises(ValueError, match="already compiled"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend=CompileCounter()))


def test_adapter_targeting_another_module_raises_and_changes_nothing(llama_factory, tmp_path, input_ids):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    other = save_adapter(llama_factory, tmp_path / "b", seed=2, target_modules=["q_proj", "k_proj"])
    model = load(llama_factory, first)
    before = logits(model, input_ids)
    with pytest.raises(RuntimeError, match="unexpected keys found: .*k_proj"):
        hotswap_adapter(model, str(other), adapter_name="default")
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


def test_module_the_new_adapter_does_not_target_adds_nothing(llama_factory, tmp_path, input_ids):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    fewer = save_adapter(llama_factory, tmp_path / "b", seed=2, target_modules=["q_proj"])
    model = load(llama_factory, first)
    hotswap_adapter(model, str(fewer), adapter_name="default")
    expected = logits(load(llama_factory, fewer), input_ids)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-6, atol=1e-6)


def test_incompatible_config_raises_naming_the_setting(llama_factory, tmp_path):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    rslora = save_adapter(llama_factory, tmp_path / "b", seed=2, use_rslora=True)
    with pytest.raises(ValueError, match="Configs are incompatible: for use_rslora, False != True"):
        hotswap_adapter(load(llama_factory, first), str(rslora), adapter_name="default")


def test_merged_adapter_cannot_be_swapped(llama_factory, tmp_path):
    first = save_adapter(llama_factory, tmp_path / "a", seed=1)
    model = load(llama_factory, first)
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        hotswap_adapter(
            model, str(save_adapter(llama_factory, tmp_path / "b", seed=2)), adapter_name="default"
        )
