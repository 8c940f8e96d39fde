"""QLoRA: LoRA on bitsandbytes 4-bit (NF4/FP4) and 8-bit layers; peft 0.21.2 + bitsandbytes are the oracle.

All on CPU. Each comparison loads the same saved tiny Llama twice, once for peft and once for lora_engine; the
adapter weights are copied from peft's model into ours (the in-memory keys are the same by design).
"""

import math

import bitsandbytes as bnb
import peft
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from conftest import VOCAB_SIZE, mixed_batch_and_single_runs, move_dora_magnitudes_off_their_norms
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import lora_engine
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.bnb import (
    LoraLinear4bit,
    LoraLinear8bit,
    dequantized_weight,
    is_bnb_linear,
    wrap_bnb_linear,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt. inputs will be cast",
    "ignore:Merge lora module",
    "ignore:Unmerge lora module",
)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
LORA_LAYERS = 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
# The four 4-bit formats (quant type, double quantization), and the QLoRA one most tests run on.
FOUR_BIT_FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
QLORA = {"bits": 4, "quant_type": "nf4", "double_quant": True}


@pytest.fixture(scope="module")
def load(tiny_llama_4bit_folder):
    """``load(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)``: a fresh quantized
    load of the tiny Llama, its activations in ``compute_dtype``; ``keep_cpu_repacking=True`` leaves bnb's CPU
    repacking on."""

    def load_quantized(
        bits: int = 4,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        keep_cpu_repacking: bool = False,
    ) -> LlamaForCausalLM:
        if bits == 4:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=compute_dtype,
            )
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        model = LlamaForCausalLM.from_pretrained(
            tiny_llama_4bit_folder, quantization_config=quantization, dtype=compute_dtype
        )
        if not keep_cpu_repacking:
            # On CPUs with AVX512-BF16, bnb repacks a 4-bit weight in place into a CPU-only layout at its
            # first no-grad eval forward, which peft's merge misreads. Keep bnb's portable layout so that
            # every machine runs the same path; test_dequantize_reads_weights_bnb_repacked_for_cpu covers
            # the other.
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
        return model.eval()

    return load_quantized


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))


def _randomize_lora_B(model, std: float = 0.02) -> None:
    """lora_B ~ N(0, std), seeded: peft's init leaves B at zero, which would make every adapter a no-op."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _copy_adapter_weights(peft_model, our_model) -> None:
    """Copy the LoRA factors; the bnb quant-state entries of the state dict cannot be loaded back."""
    peft_state = peft_model.state_dict()
    assert our_model.state_dict().keys() == peft_state.keys()
    adapter_state = {key: value for key, value in peft_state.items() if ".lora_" in key}
    assert not our_model.load_state_dict(adapter_state, strict=False).unexpected_keys


def _peft_and_ours(load, prepare: bool = False, lora: dict = LORA, **load_kwargs):
    """peft's and our LoRA model, each on a fresh quantized load, with one adapter (lora_B ~ N(0, 0.02))
    configured by ``lora``."""
    peft_base, our_base = load(**load_kwargs), load(**load_kwargs)
    if prepare:
        peft_base = peft.prepare_model_for_kbit_training(peft_base)
        our_base = prepare_model_for_kbit_training(our_base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        peft_model = peft.get_peft_model(peft_base, peft.LoraConfig(**lora))
    our_model = lora_engine.get_peft_model(our_base, lora_engine.LoraConfig(**lora))
    _randomize_lora_B(peft_model)
    _copy_adapter_weights(peft_model, our_model)
    return peft_model, our_model


def _ours(load, **load_kwargs):
    """Our LoRA model alone on a fresh quantized load, its adapter seeded (lora_B ~ N(0, 0.02))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lora_engine.get_peft_model(load(**load_kwargs), lora_engine.LoraConfig(**LORA))
    _randomize_lora_B(model)
    return model


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _quantized_weights(model) -> dict[str, torch.Tensor]:
    """Every bnb layer's weight and statistics as it saves them (4-bit: packed bytes + quant state), keyed by
    the layer's name in the transformers model."""
    return {
        f"{name.replace('.base_layer', '')}.{key}": value.clone()
        for name, module in model.named_modules()
        if is_bnb_linear(module)
        for key, value in module.state_dict().items()
    }


# --------------------------------------------------------------------------- wrapping
@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT_FORMATS)
def test_get_peft_model_wraps_4bit_layers_in_lora_linear_4bit(load, quant_type, double_quant):
    model = lora_engine.get_peft_model(
        load(quant_type=quant_type, double_quant=double_quant), lora_engine.LoraConfig(**LORA)
    )
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == LORA_LAYERS
    assert all(isinstance(layer, LoraLinear4bit) for layer in layers)
    down_proj = model.base_model.model.model.layers[0].mlp.down_proj
    assert down_proj.base_layer.weight.quant_type == quant_type
    assert down_proj.base_layer.weight.compress_statistics == double_quant
    assert (down_proj.in_features, down_proj.out_features) == (128, 64)
    assert down_proj.lora_A["default"].weight.shape == (4, 128)
    assert down_proj.lora_B["default"].weight.shape == (64, 4)


def test_get_peft_model_wraps_8bit_layers_in_lora_linear_8bit(load):
    model = lora_engine.get_peft_model(load(bits=8), lora_engine.LoraConfig(**LORA))
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == LORA_LAYERS
    assert all(isinstance(layer, LoraLinear8bit) for layer in layers)


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_adapter_factors_have_peft_dtype_and_keys(load, load_kwargs):
    """Factors in the 4-bit compute dtype / fp32 for 8-bit, upcast to fp32; state-dict keys equal peft's."""
    peft_model, our_model = _peft_and_ours(load, compute_dtype=torch.bfloat16, **load_kwargs)
    peft_state, our_state = peft_model.state_dict(), our_model.state_dict()
    assert our_state.keys() == peft_state.keys()
    for key, value in our_state.items():
        assert value.dtype == peft_state[key].dtype, key


@pytest.mark.parametrize(("bits", "factor_dtype"), [(4, torch.bfloat16), (8, torch.float32)])
def test_factors_are_created_in_the_4bit_compute_dtype_as_in_peft(load, bits, factor_dtype):
    """Without the fp32 upcast: the 4-bit layer's compute dtype, and fp32 beside an int8 weight."""
    for get_peft_model, config in (
        (peft.get_peft_model, peft.LoraConfig),
        (lora_engine.get_peft_model, lora_engine.LoraConfig),
    ):
        model = get_peft_model(
            load(bits=bits, compute_dtype=torch.bfloat16), config(**LORA), autocast_adapter_dtype=False
        )
        factors = [param for name, param in model.named_parameters() if ".lora_" in name]
        assert factors and all(param.dtype == factor_dtype for param in factors), get_peft_model.__module__


def test_wrapping_another_bitsandbytes_module_names_it():
    with pytest.raises(ValueError, match=r"'model\.embed_tokens' is a bitsandbytes StableEmbedding"):
        wrap_bnb_linear("model.embed_tokens", bnb.nn.StableEmbedding(VOCAB_SIZE, 64))


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_trainable_parameters_match_peft_after_kbit_preparation(load, load_kwargs):
    peft_model, our_model = _peft_and_ours(load, prepare=True, **load_kwargs)
    peft_trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    our_trainable = {name for name, param in our_model.named_parameters() if param.requires_grad}
    assert our_trainable == peft_trainable
    assert our_model.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]


# --------------------------------------------------------------------------- forward and backward
@pytest.mark.parametrize(
    "load_kwargs",
    [QLORA, {**QLORA, "compute_dtype": torch.bfloat16}, {"bits": 8}],
    ids=["4bit-fp32", "4bit-bf16", "8bit"],
)
def test_logits_loss_and_lora_grads_match_peft(load, tokens, load_kwargs):
    peft_model, our_model = _peft_and_ours(load, prepare=True, **load_kwargs)
    results = []
    for model in (peft_model, our_model):
        model.train()
        output = model(input_ids=tokens, labels=tokens)
        output.loss.backward()
        grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
        results.append((output.logits, output.loss, grads))
    (peft_logits, peft_loss, peft_grads), (our_logits, our_loss, our_grads) = results
    torch.testing.assert_close(our_logits, peft_logits, rtol=0, atol=0)
    torch.testing.assert_close(our_loss, peft_loss, rtol=0, atol=0)
    assert our_grads.keys() == peft_grads.keys() and len(our_grads) == 2 * LORA_LAYERS
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_logits_match_peft_under_cpu_autocast(load, tokens):
    peft_model, our_model = _peft_and_ours(load, **QLORA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_logits, our_logits = _logits(peft_model, tokens), _logits(our_model, tokens)
    torch.testing.assert_close(our_logits, peft_logits, rtol=0, atol=0)


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_mixed_adapter_batch_matches_peft(load, load_kwargs):
    peft_model, our_model = _peft_and_ours(load, **load_kwargs)
    peft_model.add_adapter("other", peft.LoraConfig(**LORA))
    our_model.add_adapter("other", lora_engine.LoraConfig(**LORA))
    _randomize_lora_B(peft_model)
    _copy_adapter_weights(peft_model, our_model)
    rows = torch.randint(0, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(2))
    adapter_names = ["other", "__base__", "default"]
    peft_model.eval(), our_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=rows, adapter_names=adapter_names).logits
        our_logits = our_model(input_ids=rows, adapter_names=adapter_names).logits
    torch.testing.assert_close(our_logits, peft_logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT_FORMATS)
def test_merge_and_unload_4bit_equals_peft_byte_for_byte(load, tokens, quant_type, double_quant):
    peft_model, our_model = _peft_and_ours(load, quant_type=quant_type, double_quant=double_quant)
    peft_merged, our_merged = peft_model.merge_and_unload(), our_model.merge_and_unload()
    peft_weights, our_weights = _quantized_weights(peft_merged), _quantized_weights(our_merged)
    assert our_weights.keys() == peft_weights.keys() and our_weights
    for name, value in our_weights.items():
        assert torch.equal(value, peft_weights[name]), name
    torch.testing.assert_close(_logits(our_merged, tokens), _logits(peft_merged, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_merge_adapter_then_unmerge_adapter_match_peft(load, tokens, load_kwargs):
    peft_model, our_model = _peft_and_ours(load, **load_kwargs)
    for model in (peft_model, our_model):
        model.merge_adapter()
    torch.testing.assert_close(_logits(our_model, tokens), _logits(peft_model, tokens), rtol=0, atol=0)
    for model in (peft_model, our_model):
        model.unmerge_adapter()
    torch.testing.assert_close(_logits(our_model, tokens), _logits(peft_model, tokens), rtol=0, atol=0)
    peft_weights, our_weights = _quantized_weights(peft_model), _quantized_weights(our_model)
    for name, value in our_weights.items():
        assert torch.equal(value, peft_weights[name]), name


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_disabling_adapters_of_a_merged_model_unmerges_them_as_peft_does(load, tokens, load_kwargs):
    peft_model, our_model = _peft_and_ours(load, **load_kwargs)
    logits = []
    for model in (peft_model, our_model):
        model.merge_adapter()
        with model.disable_adapter():
            logits.append(_logits(model, tokens))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_merging_into_4bit_warns_about_rounding(load):
    model = _ours(load, **QLORA)
    with pytest.warns(UserWarning, match="4-bit linear may get different generations due to rounding errors"):
        model.merge_adapter()


def _break_one_adapter(model) -> None:
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[0, 0] = float("nan")


def test_layer_safe_merge_refuses_nan_before_requantizing(load):
    model = _ours(load, **QLORA)
    _break_one_adapter(model)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    packed, absmax = layer.base_layer.weight.data.clone(), layer.base_layer.weight.quant_state.absmax.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.data, packed)
    assert torch.equal(layer.base_layer.weight.quant_state.absmax, absmax)
    assert not layer.merged


def test_safe_merge_refuses_nan_adapter_and_leaves_4bit_weights_untouched(load):
    model = _ours(load, **QLORA)
    _break_one_adapter(model)
    before = _quantized_weights(model)
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)
    after = _quantized_weights(model)
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert torch.equal(value, before[name]), name


# --------------------------------------------------------------------------- adapter files
def test_adapter_saved_by_us_loads_in_peft_on_4bit_and_full_precision_bases(
    load, tiny_llama_4bit_folder, tokens, tmp_path
):
    our_model = _ours(load, **QLORA)
    our_logits = _logits(our_model, tokens)
    with our_model.disable_adapter():
        our_effect = our_logits - _logits(our_model, tokens)
    our_model.save_pretrained(tmp_path)

    on_4bit = peft.PeftModel.from_pretrained(load(**QLORA), tmp_path)
    torch.testing.assert_close(_logits(on_4bit, tokens), our_logits, rtol=0, atol=0)

    full_precision = LlamaForCausalLM.from_pretrained(tiny_llama_4bit_folder).eval()
    base_logits = _logits(full_precision, tokens)
    full_logits = _logits(peft.PeftModel.from_pretrained(full_precision, tmp_path), tokens)
    # The same adapter on the base rounded to NF4 or not: close logits, and nearly the same effect.
    assert (full_logits - our_logits).abs().max() < 0.1
    full_effect = full_logits - base_logits
    assert torch.cosine_similarity(full_effect.flatten(), our_effect.flatten(), dim=0) > 0.95


def test_adapter_saved_by_peft_loads_in_ours(load, tokens, tmp_path):
    peft_model, _ = _peft_and_ours(load, **QLORA)
    peft_model.save_pretrained(tmp_path)
    our_model = lora_engine.PeftModel.from_pretrained(load(**QLORA), tmp_path)
    assert all(
        isinstance(module, LoraLinear4bit) for module in our_model.modules() if isinstance(module, LoraLayer)
    )
    torch.testing.assert_close(_logits(our_model, tokens), _logits(peft_model, tokens), rtol=0, atol=0)


# --------------------------------------------------------------------------- training
def test_a_few_qlora_training_steps_lower_the_loss(load, tokens):
    torch.manual_seed(0)
    model = lora_engine.get_peft_model(
        prepare_model_for_kbit_training(load(**QLORA)), lora_engine.LoraConfig(**LORA)
    )
    model.train()
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- high-precision export
def _has_bnb_layers(model) -> bool:
    return any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())


@pytest.mark.parametrize("load_kwargs", [QLORA, {"bits": 8}], ids=["4bit", "8bit"])
def test_to_dense_holds_the_dequantized_weight_plus_the_lora_delta(load, load_kwargs):
    model = _ours(load, compute_dtype=torch.bfloat16, **load_kwargs)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    expected = dequantized_weight(layer.base_layer) + layer.get_delta_weight("default")
    dense = layer.to_dense(["default"], dtype=torch.float32)
    assert type(dense) is torch.nn.Linear and dense.bias is None
    assert torch.equal(dense.weight, expected)
    default_dtype = torch.bfloat16 if load_kwargs["bits"] == 4 else torch.float32  # 4-bit: the compute dtype
    assert torch.equal(layer.to_dense(["default"]).weight, expected.to(default_dtype))


def test_dequantized_export_is_closer_to_the_unmerged_model_than_a_requantized_merge(load, tokens):
    requantized_model, exported_model = _ours(load, **QLORA), _ours(load, **QLORA)
    unmerged_logits = _logits(exported_model, tokens)
    requantized = requantized_model.merge_and_unload()
    exported = exported_model.base_model.merge_and_unload_dequantized(dtype=torch.float32)
    assert not _has_bnb_layers(exported)
    assert all(param.dtype == torch.float32 for param in exported.parameters())
    requantized_error = (_logits(requantized, tokens) - unmerged_logits).abs().max().item()
    exported_error = (_logits(exported, tokens) - unmerged_logits).abs().max().item()
    print(
        f"\n4-bit NF4, max |logit - unmerged logit|: merge_and_unload (requantized) {requantized_error:.3g}, "
        f"merge_and_unload_dequantized {exported_error:.3g}"
    )
    assert exported_error < requantized_error


def test_dequantized_export_does_not_add_merged_adapters_again(load, tokens):
    model = _ours(load, **QLORA)
    model.merge_adapter()
    merged_logits = _logits(model, tokens)
    exported = model.base_model.merge_and_unload_dequantized(dtype=torch.float32)
    torch.testing.assert_close(_logits(exported, tokens), merged_logits, rtol=1e-4, atol=1e-4)


def test_dequantized_export_saves_and_reloads_as_plain_llama(load, tokens, tmp_path):
    exported = _ours(load, **QLORA).base_model.merge_and_unload_dequantized(dtype=torch.float32)
    exported_logits = _logits(exported, tokens)
    exported.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert not _has_bnb_layers(reloaded)
    torch.testing.assert_close(_logits(reloaded, tokens), exported_logits, rtol=0, atol=0)


@pytest.mark.skipif(
    not has_avx512bf16(), reason="bnb repacks 4-bit weights for CPU inference only with AVX512-BF16"
)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_reads_weights_bnb_repacked_for_cpu(load, tokens, double_quant):
    model = _ours(load, keep_cpu_repacking=True, **{**QLORA, "double_quant": double_quant})
    layers = [module for module in model.modules() if isinstance(module, LoraLinear4bit)]
    before = [dequantized_weight(layer.base_layer) for layer in layers]
    _logits(model, tokens)  # a no-grad eval forward repacks every weight in place
    assert all(layer.base_layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    for layer, weight in zip(layers, before):
        # The repacking rounds each block's absmax to bf16 (8 significant bits), no more.
        torch.testing.assert_close(dequantized_weight(layer.base_layer), weight, rtol=2**-8, atol=1e-7)


@pytest.mark.skipif(
    not has_avx512bf16(), reason="bnb repacks 4-bit weights for CPU inference only with AVX512-BF16"
)
def test_loading_an_adapter_leaves_a_cpu_repacked_4bit_base_untouched(load, tokens, tmp_path):
    """``model.state_dict()`` would convert bnb's CPU layout back in place, rounding the absmax again; loading
    an adapter reads the model's tensors without it (``state_tensors``)."""
    model = _ours(load, keep_cpu_repacking=True, **QLORA)
    logits = _logits(model, tokens)  # a no-grad eval forward repacks every weight in place
    layers = [module for module in model.modules() if isinstance(module, LoraLinear4bit)]
    packed = [layer.base_layer.weight.data.clone() for layer in layers]
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "default")
    model.load_adapter(tmp_path, "reloaded")
    assert all(layer.base_layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    assert all(torch.equal(layer.base_layer.weight.data, before) for layer, before in zip(layers, packed))
    torch.testing.assert_close(_logits(model, tokens), logits, rtol=0, atol=0)


def test_parameter_counts_equal_peft_on_a_4bit_base(load):
    ours = lora_engine.get_peft_model(
        load(), lora_engine.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# --------------------------------------------------------------------------- DoRA on a quantized base
DORA = {**LORA, "target_modules": ["q_proj", "v_proj"], "use_dora": True}


def test_dora_on_4bit_logits_loss_and_every_gradient_match_peft(load, tokens):
    peft_model, our_model = _peft_and_ours(load, lora=DORA, **QLORA)
    results = []
    for model in (peft_model, our_model):
        model.train()
        output = model(input_ids=tokens, labels=tokens)
        output.loss.backward()
        grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
        results.append((output.logits, output.loss, grads))
    (peft_logits, peft_loss, peft_grads), (our_logits, our_loss, our_grads) = results
    torch.testing.assert_close(our_logits, peft_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_loss, peft_loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == peft_grads.keys()
    assert sum("lora_magnitude_vector" in name for name in our_grads) == 4  # q and v of 2 layers
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_dora_on_4bit_merge_and_unmerge_match_peft(load, tokens):
    peft_model, our_model = _peft_and_ours(load, lora=DORA, **QLORA)
    with our_model.disable_adapter():
        base_logits = _logits(our_model, tokens)
    for model in (peft_model, our_model):
        model.merge_adapter()
    # Both requantize m/‖W+ΔW‖·(W+ΔW); last-bit differences in the sum can move a value to another 4-bit code.
    merged_logits = _logits(our_model, tokens)
    assert not torch.allclose(merged_logits, base_logits, rtol=1e-3, atol=1e-3)  # the merge changed the model
    torch.testing.assert_close(merged_logits, _logits(peft_model, tokens), rtol=1e-3, atol=1e-3)
    for model in (peft_model, our_model):
        model.unmerge_adapter()
    torch.testing.assert_close(_logits(our_model, tokens), _logits(peft_model, tokens), rtol=1e-3, atol=1e-3)


def test_dora_on_8bit_is_refused_naming_the_layer(load):
    config = lora_engine.LoraConfig(**{**DORA, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"use_dora=True on '.*q_proj' \(Linear8bitLt\).*not supported yet"):
        lora_engine.get_peft_model(load(bits=8), config)


def test_dora_on_4bit_rows_of_a_mixed_batch_equal_single_adapter_runs(load):
    model = lora_engine.get_peft_model(load(), lora_engine.LoraConfig(**{**DORA, "init_lora_weights": False}))
    model.add_adapter("other", lora_engine.LoraConfig(**{**DORA, "r": 2, "init_lora_weights": False}))
    move_dora_magnitudes_off_their_norms(model)
    model.eval()
    routes = ["other", "__base__", "default"]
    rows = torch.randint(0, VOCAB_SIZE, (len(routes), 12), generator=torch.Generator().manual_seed(3))

    def run(model, input_ids, **kwargs):
        return model(input_ids=input_ids, **kwargs).logits

    mixed, alone = mixed_batch_and_single_runs(model, run, rows, routes)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
