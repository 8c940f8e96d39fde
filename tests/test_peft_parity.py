"""lora_engine against peft 0.21.2 as the oracle: each model pair is built from identical base weights and
identical adapter weights, then driven through the same calls.

peft's adapters are created with ``init_lora_weights=False`` (non-zero ``lora_B``) and copied into ours, so every
comparison sees a non-trivial adapter. Models are tiny and built from configs; nothing is downloaded.
"""

import copy

import peft
import pytest
import torch
from conftest import copy_lora_weights
from torch import nn
from transformers import LlamaForCausalLM

import lora_engine
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper

FACTORY_FIXTURES = {"llama": "llama_factory", "gpt2": "gpt2_factory", "bert": "bert_cls_factory"}

# (model, LoraConfig arguments): every targeting form, on the model kinds where it applies.
TARGETING_CASES = [
    pytest.param("llama", {"target_modules": ["q_proj", "v_proj"]}, id="llama-list"),
    pytest.param("llama", {"target_modules": r".*\.(q_proj|down_proj)"}, id="llama-regex"),
    pytest.param("llama", {"target_modules": "all-linear"}, id="llama-all-linear"),
    pytest.param(
        "llama",
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "gate_proj"]},
        id="llama-exclude-list",
    ),
    pytest.param(
        "llama",
        {"target_modules": "all-linear", "exclude_modules": r".*layers\.0\..*"},
        id="llama-exclude-regex",
    ),
    pytest.param(
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        id="llama-layers-to-transform",
    ),
    pytest.param(
        "llama",
        {
            "target_modules": ["q_proj", "v_proj"],
            "r": 4,
            "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            "alpha_pattern": {"v_proj": 3.0},
        },
        id="llama-rank-alpha-pattern",
    ),
    pytest.param(
        "llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, id="llama-modules-to-save"
    ),
    pytest.param("llama", {"target_modules": ["embed_tokens", "q_proj"]}, id="llama-embedding"),
    pytest.param("llama", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}, id="llama-rslora"),
    pytest.param("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}, id="gpt2-conv1d"),
    pytest.param("gpt2", {"target_modules": "all-linear"}, id="gpt2-all-linear"),
    pytest.param(
        "gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}, id="gpt2-bias-all"
    ),
    pytest.param(
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only"},
        id="gpt2-bias-lora-only",
    ),
    pytest.param("bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}, id="bert-seq-cls"),
    pytest.param(
        "bert", {"task_type": "SEQ_CLS", "target_modules": "all-linear"}, id="bert-seq-cls-all-linear"
    ),
]

# (model, LoraConfig arguments) whose logits, loss and gradients are compared.
FORWARD_CASES = [
    pytest.param("llama", {"target_modules": ["q_proj", "v_proj"]}, id="llama"),
    pytest.param(
        "llama", {"target_modules": "all-linear", "lora_dropout": 0.0}, id="llama-all-linear-dropout-0"
    ),
    pytest.param("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}, id="gpt2-conv1d"),
    pytest.param(
        "gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}, id="gpt2-bias-all"
    ),
    pytest.param(
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only"},
        id="gpt2-bias-lora-only",
    ),
    pytest.param("bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}, id="bert-seq-cls"),
    pytest.param("llama", {"target_modules": ["embed_tokens", "q_proj"]}, id="llama-embedding"),
    pytest.param("llama", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}, id="llama-rslora"),
    pytest.param(
        "llama",
        {
            "target_modules": ["q_proj", "v_proj"],
            "r": 4,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3.0},
        },
        id="llama-rank-alpha-pattern",
    ),
    pytest.param(
        "llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, id="llama-modules-to-save"
    ),
]

QV = {"target_modules": ["q_proj", "v_proj"]}
BROKEN_LAYER = "model.layers.1.self_attn.v_proj"  # the last targeted layer: every other one comes first


# ---------------------------------------------------------------------------------------------- helpers
def build_pair(make, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """(peft model, our model) on identical bases, ours holding a copy of peft's non-trivial adapter."""
    config.setdefault("init_lora_weights", False)
    theirs = peft.get_peft_model(make(seed, dtype), peft.LoraConfig(**copy.deepcopy(config)))
    ours = lora_engine.get_peft_model(make(seed, dtype), lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def add_adapter_to_pair(theirs, ours, adapter_name: str, **config) -> None:
    """Add the same adapter to both models; ours gets a copy of peft's weights."""
    config.setdefault("init_lora_weights", False)
    theirs.add_adapter(adapter_name, peft.LoraConfig(**copy.deepcopy(config)))
    ours.add_adapter(adapter_name, lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)


def model_inputs(model_kind: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if model_kind == "bert":
        return {"input_ids": input_ids, "labels": torch.tensor([0, 2])}
    return {"input_ids": input_ids, "labels": input_ids}


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def gradients(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: grad}`` of every parameter that requires grad, after one backward of the model's loss."""
    model(**inputs).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the transformers model's own parameters (no adapter factors), keyed without LoRA wrappers."""
    weights = {}
    for name, param in model.get_base_model().named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        weights[name.replace(".base_layer", "").replace(".original_module", "")] = param.detach().clone()
    return weights


def break_adapter(model) -> None:
    """Put one NaN into ``lora_B`` of BROKEN_LAYER."""
    with torch.no_grad():
        model.get_base_model().get_submodule(BROKEN_LAYER).lora_B["default"].weight[0, 0] = float("nan")


def build_three_adapter_pair(make):
    """Adapters "default", "zeta", "alpha" on the same modules, in that order; "zeta" active."""
    theirs, ours = build_pair(make, **QV)
    add_adapter_to_pair(theirs, ours, "zeta", **QV)
    add_adapter_to_pair(theirs, ours, "alpha", **QV)
    theirs.set_adapter("zeta")
    ours.set_adapter("zeta")
    return theirs, ours


# ------------------------------------------------------------------------------------------ 1. targeting
@pytest.mark.parametrize(("model_kind", "config"), TARGETING_CASES)
def test_trainable_parameter_counts_match_peft(request, model_kind, config):
    make = request.getfixturevalue(FACTORY_FIXTURES[model_kind])
    theirs, ours = build_pair(make, **config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(("model_kind", "config"), TARGETING_CASES)
def test_trainable_parameter_names_match_peft(request, model_kind, config):
    make = request.getfixturevalue(FACTORY_FIXTURES[model_kind])
    theirs, ours = build_pair(make, **config)
    assert trainable_names(ours) == trainable_names(theirs)


# ------------------------------------------------------------------------------ 2. forward and backward
@pytest.mark.parametrize(("model_kind", "config"), FORWARD_CASES)
def test_logits_match_peft(request, input_ids, model_kind, config):
    make = request.getfixturevalue(FACTORY_FIXTURES[model_kind])
    theirs, ours = build_pair(make, **config)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("model_kind", "config"), FORWARD_CASES)
def test_loss_matches_peft(request, input_ids, model_kind, config):
    make = request.getfixturevalue(FACTORY_FIXTURES[model_kind])
    theirs, ours = build_pair(make, **config)
    inputs = model_inputs(model_kind, input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).loss, theirs(**inputs).loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("model_kind", "config"), FORWARD_CASES)
def test_gradients_match_peft(request, input_ids, model_kind, config):
    make = request.getfixturevalue(FACTORY_FIXTURES[model_kind])
    theirs, ours = build_pair(make, **config)
    inputs = model_inputs(model_kind, input_ids)
    their_grads, our_grads = gradients(theirs, inputs), gradients(ours, inputs)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_base_keeps_adapters_in_fp32_like_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, dtype=torch.bfloat16, **QV)
    their_dtypes = {name: param.dtype for name, param in theirs.named_parameters()}
    assert {name: param.dtype for name, param in ours.named_parameters()} == their_dtypes


def test_bf16_base_logits_match_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, dtype=torch.bfloat16, **QV)
    our_logits, their_logits = logits(ours, input_ids), logits(theirs, input_ids)
    assert our_logits.dtype == their_logits.dtype == torch.bfloat16
    torch.testing.assert_close(our_logits, their_logits, atol=1e-2, rtol=1e-2)


def test_bf16_base_gradients_match_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, dtype=torch.bfloat16, **QV)
    inputs = model_inputs("llama", input_ids)
    their_grads, our_grads = gradients(theirs, inputs), gradients(ours, inputs)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        assert grad.dtype == their_grads[name].dtype == torch.float32, name
        torch.testing.assert_close(grad, their_grads[name], atol=2e-2, rtol=2e-2, msg=name)


# ---------------------------------------------------------------------------------------------- 3. dropout
def test_dropout_makes_train_mode_outputs_differ_between_calls(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, lora_dropout=0.5, **QV)
    ours.train()
    with torch.no_grad():
        first, second = ours(input_ids=input_ids).logits, ours(input_ids=input_ids).logits
    assert not torch.allclose(first, second)


def test_dropout_is_off_in_eval_mode_like_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, lora_dropout=0.5, **QV)
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_seeded_dropout_gradients_match_finite_differences():
    """With the global seed fixed before each forward the dropout mask repeats, so the op is a deterministic
    function of (x, lora_A, lora_B) whose backward must agree with finite differences."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(5, 3)).double()
        model = lora_engine.get_peft_model(
            base, lora_engine.LoraConfig(target_modules=["0"], r=2, lora_dropout=0.5, init_lora_weights=False)
        ).train()
        params = dict(model.named_parameters())
        a_name, b_name = (
            "base_model.model.0.lora_A.default.weight",
            "base_model.model.0.lora_B.default.weight",
        )
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        lora_A = params[a_name].detach().clone().requires_grad_(True)
        lora_B = params[b_name].detach().clone().requires_grad_(True)

        def forward_with_repeated_mask(x, lora_A, lora_B):
            torch.manual_seed(1234)
            return torch.func.functional_call(model, {a_name: lora_A, b_name: lora_B}, (x,))

        assert torch.autograd.gradcheck(forward_with_repeated_mask, (x, lora_A, lora_B))


# ---------------------------------------------------------------------------------------- 4. merge, unload
def test_merge_adapter_keeps_outputs(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, target_modules="all-linear")
    unmerged = logits(ours, input_ids)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_unmerge_adapter_restores_base_weights(llama_factory):
    _, ours = build_pair(llama_factory, target_modules="all-linear")
    original = base_weights(ours)
    ours.merge_adapter()
    ours.unmerge_adapter()
    restored = base_weights(ours)
    assert restored.keys() == original.keys()
    for name, weight in restored.items():
        torch.testing.assert_close(weight, original[name], atol=1e-6, rtol=1e-6, msg=name)


def test_merge_and_unload_returns_plain_transformers_model(llama_factory):
    _, ours = build_pair(llama_factory, target_modules="all-linear", modules_to_save=["lm_head"])
    merged = ours.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert not [
        name
        for name, module in merged.named_modules()
        if isinstance(module, LoraLayer | ModulesToSaveWrapper)
    ]


def test_merge_and_unload_drops_peft_config_like_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV)
    assert hasattr(ours.merge_and_unload(), "peft_config") == hasattr(
        theirs.merge_and_unload(), "peft_config"
    )


def test_merge_and_unload_logits_equal_unmerged_logits(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, target_modules="all-linear", modules_to_save=["lm_head"])
    unmerged = logits(ours, input_ids)
    torch.testing.assert_close(logits(ours.merge_and_unload(), input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_logits_equal_peft_merge_and_unload(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, target_modules="all-linear", modules_to_save=["lm_head"])
    their_merged, our_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    torch.testing.assert_close(
        logits(our_merged, input_ids), logits(their_merged, input_ids), atol=1e-6, rtol=1e-5
    )


def test_unload_returns_untouched_base(llama_factory):
    _, ours = build_pair(llama_factory, target_modules="all-linear", modules_to_save=["lm_head"])
    unloaded = ours.unload()
    original = llama_factory().state_dict()
    assert type(unloaded) is LlamaForCausalLM
    assert unloaded.state_dict().keys() == original.keys()
    for name, weight in unloaded.state_dict().items():
        assert torch.equal(weight, original[name]), name


def test_disable_adapter_gives_base_logits(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, target_modules="all-linear")
    with ours.disable_adapter():
        disabled = logits(ours, input_ids)
    torch.testing.assert_close(disabled, logits(llama_factory(), input_ids), atol=0, rtol=0)


def test_adapter_outputs_return_after_disable_adapter(llama_factory, input_ids):
    _, ours = build_pair(llama_factory, target_modules="all-linear")
    before = logits(ours, input_ids)
    with ours.disable_adapter():
        pass
    torch.testing.assert_close(logits(ours, input_ids), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "targets",
    [pytest.param(QV, id="linear"), pytest.param({"target_modules": ["embed_tokens"]}, id="embedding")],
)
def test_disable_adapter_on_merged_model_gives_base_logits_like_peft(llama_factory, input_ids, targets):
    theirs, ours = build_pair(llama_factory, **targets)
    theirs.merge_adapter()
    ours.merge_adapter()
    with theirs.disable_adapter(), ours.disable_adapter():
        torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=1e-5)


def test_merged_gpt2_conv1d_weights_equal_peft(gpt2_factory):
    theirs, ours = build_pair(gpt2_factory, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    theirs.merge_adapter()
    ours.merge_adapter()
    their_weights = base_weights(theirs)
    for name, weight in base_weights(ours).items():
        torch.testing.assert_close(weight, their_weights[name], atol=1e-6, rtol=1e-6, msg=name)


def test_merged_gpt2_conv1d_logits_equal_unmerged(gpt2_factory, input_ids):
    _, ours = build_pair(gpt2_factory, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    unmerged = logits(ours, input_ids)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, input_ids), unmerged, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ 5. safe_merge
@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_nan_naming_layer_and_adapter_and_leaves_every_base_weight_untouched(
    llama_factory, merge
):
    _, ours = build_pair(llama_factory, **QV)
    break_adapter(ours)
    original = base_weights(ours)
    with pytest.raises(ValueError, match=rf"{BROKEN_LAYER}: NaNs detected.*'default'"):
        getattr(ours, merge)(safe_merge=True)
    for name, weight in base_weights(ours).items():
        assert torch.equal(weight, original[name]), name


# ---------------------------------------------------------------------------------------- 6. multi-adapter
def test_added_adapter_is_frozen_like_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    assert trainable_names(ours) == trainable_names(theirs)


def test_added_adapter_is_inactive_like_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    assert (ours.active_adapter, ours.active_adapters) == (theirs.active_adapter, theirs.active_adapters)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_set_adapter_switches_outputs_like_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    default_logits = logits(ours, input_ids)
    theirs.set_adapter("other")
    ours.set_adapter("other")
    other_logits = logits(ours, input_ids)
    assert not torch.allclose(other_logits, default_logits)
    torch.testing.assert_close(other_logits, logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_set_adapter_makes_only_that_adapter_trainable_like_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    theirs.set_adapter("other")
    ours.set_adapter("other")
    assert trainable_names(ours) == trainable_names(theirs)


@pytest.mark.parametrize("use_dora", [False, True])
def test_switching_back_and_forth_keeps_every_container_kind_trainable_like_peft(llama_factory, use_dora):
    """Embedding factors are bare parameters of a ParameterDict, DoRA's magnitude a module of its own: a switch
    freezes and unfreezes each kind, over several switches (it touches only the adapters it changes)."""
    config = {"target_modules": ["embed_tokens", "q_proj", "v_proj"], "use_dora": use_dora}
    theirs, ours = build_pair(llama_factory, **config)
    for name in ("b", "c"):
        add_adapter_to_pair(theirs, ours, name, r=4, **config)
    for name in ("c", "default", "b", "b", "default"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert trainable_names(ours) == trainable_names(theirs)
        assert any(f".{name}." in param or param.endswith(f".{name}") for param in trainable_names(ours))


def test_several_active_adapters_sum_outputs_like_peft(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    assert ours.active_adapters == theirs.active_adapters == ["default", "other"]
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_several_active_adapters_are_all_trainable_like_peft(llama_factory):
    theirs, ours = build_pair(llama_factory, **QV)
    add_adapter_to_pair(theirs, ours, "other", target_modules=["k_proj", "v_proj"], r=4)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    assert trainable_names(ours) == trainable_names(theirs)


def test_deleting_active_adapter_picks_same_new_active_adapter_as_peft(llama_factory):
    theirs, ours = build_three_adapter_pair(llama_factory)
    theirs.delete_adapter("zeta")
    ours.delete_adapter("zeta")
    assert ours.active_adapters == theirs.active_adapters


def test_deleting_adapter_removes_its_parameters_like_peft(llama_factory):
    theirs, ours = build_three_adapter_pair(llama_factory)
    theirs.delete_adapter("zeta")
    ours.delete_adapter("zeta")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert not [name for name in ours.state_dict() if ".zeta." in name]


def test_outputs_after_deleting_active_adapter_match_peft(llama_factory, input_ids):
    theirs, ours = build_three_adapter_pair(llama_factory)
    theirs.delete_adapter("zeta")
    ours.delete_adapter("zeta")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-6, rtol=1e-5)


def test_deleting_merged_adapter_raises(llama_factory):
    _, ours = build_pair(llama_factory, **QV)
    ours.merge_adapter()
    with pytest.raises(ValueError):
        ours.delete_adapter("default")


def test_set_adapter_with_unknown_name_raises_naming_it(llama_factory):
    _, ours = build_pair(llama_factory, **QV)
    with pytest.raises(ValueError, match="no_such_adapter"):
        ours.set_adapter("no_such_adapter")


# ---------------------------------------------------------------------------------------------- 7. generate
def test_generate_matches_peft_token_for_token(llama_factory, input_ids):
    theirs, ours = build_pair(llama_factory, target_modules="all-linear")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded first row
    settings = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
    }
    their_tokens, our_tokens = theirs.generate(**settings), ours.generate(**settings)
    assert our_tokens.shape == (2, input_ids.shape[1] + 5)
    assert torch.equal(our_tokens, their_tokens)


# ------------------------------------------------------------------------------------------ 8. from_pretrained
@pytest.fixture
def saved_adapter(llama_factory, tmp_path):
    """A folder holding a non-trivial q/v adapter saved by peft."""
    theirs = peft.get_peft_model(llama_factory(), peft.LoraConfig(init_lora_weights=False, **QV))
    theirs.save_pretrained(tmp_path)
    return tmp_path


def test_from_pretrained_freezes_adapter_by_default_like_peft(llama_factory, saved_adapter):
    theirs = peft.PeftModel.from_pretrained(llama_factory().train(), saved_adapter)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory().train(), saved_adapter)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 0


def test_from_pretrained_puts_model_in_eval_mode_by_default_like_peft(llama_factory, saved_adapter):
    theirs = peft.PeftModel.from_pretrained(llama_factory().train(), saved_adapter)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory().train(), saved_adapter)
    assert ours.training is theirs.training is False


def test_from_pretrained_trainable_matches_peft_trainable_set(llama_factory, saved_adapter):
    theirs = peft.PeftModel.from_pretrained(llama_factory(), saved_adapter, is_trainable=True)
    ours = lora_engine.PeftModel.from_pretrained(llama_factory(), saved_adapter, is_trainable=True)
    assert trainable_names(ours) == trainable_names(theirs)
    assert trainable_names(ours)
