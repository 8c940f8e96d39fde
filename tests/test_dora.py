"""DoRA (``use_dora=True``) on dense layers and embeddings (convolutions: test_conv.py), with peft 0.21.2 as the oracle.

Pairs are built as in ``test_peft_parity``: identical bases, peft's non-trivial adapter (``init_lora_weights=False``,
so ``B ≠ 0`` and the magnitude differs from ``‖W‖``) copied into ours. Our forward takes the row norms from
``ops.dora_norm`` (cached ``‖W‖²`` plus rank-sized products) while peft forms ``W + s·B A``; in fp32 the two agree
to rounding, so the tolerances are those of the plain-LoRA parity tests.
"""

import copy

import peft
import pytest
import torch
from conftest import copy_lora_weights, mixed_batch_and_single_runs, move_dora_magnitudes_off_their_norms
from transformers import LlamaForCausalLM

import lora_engine
from lora_engine.layers.dora import DoraLinear

QV_DORA = {"target_modules": ["q_proj", "v_proj"], "use_dora": True}
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}

CASES = [
    pytest.param("llama_factory", QV_DORA, id="llama-qv"),
    pytest.param("llama_factory", {"target_modules": "all-linear", "use_dora": True}, id="llama-all-linear"),
    pytest.param(
        "gpt2_factory",
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_dora": True},
        id="gpt2-conv1d",
    ),
    pytest.param(
        "llama_factory",
        {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
        id="llama-embedding",
    ),
    pytest.param("llama_factory", {**QV_DORA, "use_rslora": True, "r": 4}, id="llama-rslora"),
]


def build_pair(make, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    config.setdefault("init_lora_weights", False)
    theirs = peft.get_peft_model(make(seed, dtype), peft.LoraConfig(**copy.deepcopy(config)))
    ours = lora_engine.get_peft_model(make(seed, dtype), lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def add_adapter_to_pair(theirs, ours, adapter_name: str, **config) -> None:
    config.setdefault("init_lora_weights", False)
    theirs.add_adapter(adapter_name, peft.LoraConfig(**copy.deepcopy(config)))
    ours.add_adapter(adapter_name, lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def gradients(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model(**inputs).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lm_inputs(input_ids):
    return {"input_ids": input_ids, "labels": input_ids}


def assert_gradients_match(theirs, ours, inputs):
    their_grads, our_grads = gradients(theirs, inputs), gradients(ours, inputs)
    assert our_grads.keys() == their_grads.keys()
    assert any("lora_magnitude_vector" in name for name in our_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOLERANCE, msg=name)


def a_dora_layer(model) -> DoraLinear:
    return next(module for module in model.modules() if isinstance(module, DoraLinear))


# ----------------------------------------------------------------------------------- the dora_norm op
def direct_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
    out_in = weight.T if fan_in_fan_out else weight
    return torch.linalg.norm(out_in.float() + scaling * (lora_B.float() @ lora_A.float()), dim=1)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_norm_equals_the_norm_of_the_merged_weight(fan_in_fan_out):
    from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator)  # [out, in], or [in, out] with fan_in_fan_out
    out_features, in_features = (40, 48) if fan_in_fan_out else (48, 40)
    lora_A = torch.randn(6, in_features, generator=generator)
    lora_B = torch.randn(out_features, 6, generator=generator)
    norm = dora_norm(weight, weight_row_sq_norm(weight, fan_in_fan_out), lora_A, lora_B, 0.7, fan_in_fan_out)
    torch.testing.assert_close(norm, direct_norm(weight, lora_A, lora_B, 0.7, fan_in_fan_out))


def test_dora_norm_of_a_bf16_weight_is_fp32_and_matches_the_direct_norm():
    from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(2100, 16, generator=generator).bfloat16()  # more rows than one conversion chunk
    lora_A, lora_B = torch.randn(4, 16, generator=generator), torch.randn(2100, 4, generator=generator)
    norm = dora_norm(weight, weight_row_sq_norm(weight), lora_A, lora_B, 0.5)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, direct_norm(weight, lora_A, lora_B, 0.5))


def test_dora_norm_of_an_update_that_cancels_a_row_is_zero_not_nan():
    from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm

    lora_A = torch.tensor([[1.0, 2.0, 3.0]])
    lora_B = torch.tensor([[-1.0], [1.0]])
    weight = torch.cat([lora_A, lora_A])  # row 0 + (-1)·A = 0 exactly
    norm = dora_norm(weight, weight_row_sq_norm(weight), lora_A, lora_B, 1.0)
    assert norm[0].item() == 0.0
    assert torch.isfinite(norm).all()


def test_dora_norm_keeps_its_accuracy_on_rows_the_update_nearly_cancels():
    """‖W_o‖² + 2s·B_o·(WAᵀ)_o + s²·B_o G B_oᵀ loses the digits of a tiny result; those rows are recomputed."""
    from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm

    generator = torch.Generator().manual_seed(3)
    lora_A = torch.randn(4, 64, generator=generator)
    lora_B = torch.randn(32, 4, generator=generator)
    weight = -(lora_B @ lora_A) * (1 - 1e-4) + 1e-6 * torch.randn(32, 64, generator=generator)
    exact = torch.linalg.norm(weight.double() + lora_B.double() @ lora_A.double(), dim=1)
    norm = dora_norm(weight, weight_row_sq_norm(weight), lora_A, lora_B, 1.0)
    torch.testing.assert_close(norm.double(), exact, rtol=1e-2, atol=0)


def test_dora_norm_names_the_mismatched_factor():
    from lora_engine.ops.dora_norm import dora_norm, weight_row_sq_norm

    weight = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"lora_B has shape \(7, 2\), expected \(8, 2\)"):
        dora_norm(weight, weight_row_sq_norm(weight), torch.randn(2, 5), torch.randn(7, 2), 1.0)


def test_dora_norm_forced_to_triton_on_cpu_tensors_says_where_its_kernel_runs(monkeypatch):
    # The kernel itself is tested under the interpreter in tests/kernel_ops/test_dora_norm_kernel.py.
    from lora_engine.ops.dora_norm import dora_norm

    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="op 'dora_norm' got cpu tensors: Triton runs on CUDA"):
        dora_norm(torch.randn(4, 3), torch.ones(4), torch.randn(1, 3), torch.randn(4, 1), 1.0)


# ------------------------------------------------------------------------- counts, logits, loss, gradients
@pytest.mark.parametrize(("factory", "config"), CASES)
def test_dora_trainable_parameters_match_peft(request, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(ours) == trainable_names(theirs)


@pytest.mark.parametrize(("factory", "config"), CASES)
def test_dora_logits_match_peft(request, input_ids, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


@pytest.mark.parametrize(("factory", "config"), CASES)
def test_dora_loss_and_every_gradient_match_peft(request, input_ids, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    inputs = lm_inputs(input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).loss, theirs(**inputs).loss, **TOLERANCE)
    assert_gradients_match(theirs, ours, inputs)


def test_dora_magnitude_starts_as_peft_computes_it(llama_factory):
    config = {**QV_DORA, "init_lora_weights": True}
    theirs = peft.get_peft_model(llama_factory(), peft.LoraConfig(**config))
    ours = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**config))
    their_state = theirs.state_dict()
    magnitudes = {key: value for key, value in ours.state_dict().items() if "lora_magnitude_vector" in key}
    assert magnitudes
    for key, value in magnitudes.items():
        assert torch.equal(value, their_state[key]), key


def test_dora_with_dropout_in_training_matches_peft_under_the_same_seed(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, lora_dropout=0.3, **QV_DORA)
    theirs.train()
    ours.train()
    inputs = lm_inputs(input_ids)
    torch.manual_seed(5)
    their_grads = gradients(theirs, inputs)
    torch.manual_seed(5)
    our_grads = gradients(ours, inputs)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOLERANCE, msg=name)


def test_dora_bf16_base_logits_match_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, dtype=torch.bfloat16, **QV_DORA)
    our_logits, their_logits = logits(ours, input_ids), logits(theirs, input_ids)
    assert our_logits.dtype == their_logits.dtype == torch.bfloat16
    torch.testing.assert_close(our_logits, their_logits, atol=2e-2, rtol=2e-2)


def test_dora_row_norm_follows_an_in_place_change_of_the_base_weight(llama_factory):
    _, ours = build_pair(llama_factory, **QV_DORA)
    layer = a_dora_layer(ours)
    layer.row_norm("default")  # fills the ‖W‖² cache
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    lora_A, lora_B = layer.lora_factors("default")
    expected = direct_norm(layer.base_layer.weight, lora_A, lora_B, layer.scaling["default"])
    torch.testing.assert_close(layer.row_norm("default"), expected)


def test_dora_row_norm_follows_a_merge_of_another_adapter_into_the_base_weight(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    add_adapter_to_pair(theirs, ours, "plain", target_modules=["q_proj", "v_proj"])
    layer = a_dora_layer(ours)
    layer.row_norm("default")  # fills the ‖W‖² cache
    layer.merge(adapter_names=["plain"])
    lora_A, lora_B = layer.lora_factors("default")
    expected = direct_norm(layer.base_layer.weight, lora_A, lora_B, layer.scaling["default"])
    torch.testing.assert_close(layer.row_norm("default"), expected)


# -------------------------------------------------------------------------------------------- save / load
def test_dora_saved_keys_and_tensors_equal_peft_files(llama_factory, tmp_path):
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == their_file.keys()
    assert any(key.endswith("lora_magnitude_vector") for key in our_file)
    for key, value in our_file.items():
        assert torch.equal(value, their_file[key]), key


def test_dora_adapter_saved_by_peft_loads_in_lora_engine_with_peft_logits(llama_factory, tmp_path, input_ids):
    theirs, _ = build_pair(llama_factory, **QV_DORA)
    theirs.save_pretrained(tmp_path)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory(), tmp_path)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_dora_adapter_saved_by_lora_engine_loads_in_peft_with_our_logits(llama_factory, tmp_path, input_ids):
    _, ours = build_pair(llama_factory, **QV_DORA)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama_factory(), tmp_path)
    torch.testing.assert_close(logits(theirs, input_ids), logits(ours, input_ids), **TOLERANCE)


# --------------------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize(("factory", "config"), CASES[:4])
def test_dora_merged_weights_equal_peft(request, factory, config):
    theirs, ours = build_pair(request.getfixturevalue(factory), **config)
    theirs.merge_adapter()
    ours.merge_adapter()
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], **TOLERANCE, msg=key)


def test_dora_merged_logits_equal_unmerged_logits(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, **QV_DORA)
    unmerged = logits(ours, input_ids)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_dora_unmerge_restores_the_base_weights(llama_factory):
    base = llama_factory()
    _, ours = build_pair(llama_factory, **QV_DORA)
    ours.merge_adapter()
    ours.unmerge_adapter()
    unloaded = dict(ours.unload().named_parameters())
    for name, param in base.named_parameters():
        torch.testing.assert_close(unloaded[name], param, atol=1e-6, rtol=1e-5, msg=name)


def test_dora_merge_and_unload_logits_equal_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    their_merged, our_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_merged) is LlamaForCausalLM
    torch.testing.assert_close(logits(our_merged, input_ids), logits(their_merged, input_ids), **TOLERANCE)


def test_two_dora_adapters_merged_in_turn_equal_peft(llama_factory, input_ids):
    """The second adapter's norm is taken on the weight without the first merged in, as in peft."""
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    add_adapter_to_pair(theirs, ours, "other", **QV_DORA, r=4)
    theirs.merge_adapter(["default", "other"])
    ours.merge_adapter(["default", "other"])
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], **TOLERANCE, msg=key)
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], **TOLERANCE, msg=key)


def test_safe_merge_of_a_broken_dora_adapter_raises_and_leaves_the_weights(llama_factory):
    _, ours = build_pair(llama_factory, **QV_DORA)
    layer = a_dora_layer(ours)
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


# ------------------------------------------------------------------------------------- several adapters
def test_two_active_dora_adapters_match_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["v_proj", "k_proj"], use_dora=True, r=4)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    assert trainable_names(ours) == trainable_names(theirs)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)
    assert_gradients_match(theirs, ours, lm_inputs(input_ids))


def test_plain_and_dora_adapters_on_one_layer_match_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, target_modules=["q_proj", "v_proj"])
    add_adapter_to_pair(theirs, ours, "dora", **QV_DORA)
    theirs.base_model.set_adapter(["default", "dora"])
    ours.base_model.set_adapter(["default", "dora"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)
    assert_gradients_match(theirs, ours, lm_inputs(input_ids))


def test_switching_to_a_dora_adapter_matches_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, target_modules=["q_proj", "v_proj"])
    add_adapter_to_pair(theirs, ours, "dora", **QV_DORA)
    theirs.set_adapter("dora")
    ours.set_adapter("dora")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)


def test_deleting_a_dora_adapter_removes_its_magnitude(llama_factory):
    theirs, ours = build_pair(llama_factory, target_modules=["q_proj", "v_proj"])
    add_adapter_to_pair(theirs, ours, "dora", **QV_DORA)
    theirs.delete_adapter("dora")
    ours.delete_adapter("dora")
    assert ours.state_dict().keys() == theirs.state_dict().keys()


# ---------------------------------------------------------------------------------------------- refusals
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _llama_with_dora_and_plain_adapters(llama_factory):
    """Two DoRA adapters of different ranks and a plain one on q/v and the embedding, non-trivial factors, and
    magnitudes moved off their initial norms (so that DoRA's rescaling changes the output)."""
    targets = TARGETS
    model = lora_engine.get_peft_model(
        llama_factory(),
        lora_engine.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
    )
    model.add_adapter(
        "wide", lora_engine.LoraConfig(r=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    )
    model.add_adapter("plain", lora_engine.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    move_dora_magnitudes_off_their_norms(model)
    return model.eval()


def test_dora_rows_of_a_mixed_batch_equal_single_adapter_runs(llama_factory):
    """peft refuses DoRA in mixed batches; ours runs each row as a forward with that row's adapter alone would."""
    model = _llama_with_dora_and_plain_adapters(llama_factory)
    routes = ["default", "wide", "__base__", "plain", "wide"]
    input_ids = torch.randint(0, 128, (len(routes), 7), generator=torch.Generator().manual_seed(1))

    def run(model, input_ids, **kwargs):
        return model(input_ids=input_ids, **kwargs).logits

    mixed, alone = mixed_batch_and_single_runs(model, run, input_ids, routes)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters differ, so the rows do


def test_combining_dora_adapters_is_refused_naming_them(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV_DORA)
    add_adapter_to_pair(theirs, ours, "other", **QV_DORA)
    with pytest.raises(
        ValueError, match=r"\['default', 'other'\] on '.*q_proj' \(Linear\) use use_dora=True"
    ):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined", combination_type="linear")
    assert "combined" not in ours.peft_config


def test_dora_embedding_saved_by_peft_loads_in_lora_engine_with_peft_logits(
    llama_factory, tmp_path, input_ids
):
    theirs, _ = build_pair(llama_factory, target_modules=["embed_tokens"], use_dora=True)
    theirs.save_pretrained(tmp_path)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory(), tmp_path)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), **TOLERANCE)
