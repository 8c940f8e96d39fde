"""Which modules get adapters, with which rank and alpha: peft 0.21.2 is the oracle for every rule."""

import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from conftest import VOCAB_SIZE, tiny_bert_config, tiny_gpt2_config, tiny_llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from lora_engine.targeting import (
    all_linear_targets,
    default_target_modules,
    find_targets,
    is_module_to_save,
    is_targeted,
    rank_and_alpha,
)

# The only config attributes targeting.py may read, with peft's defaults.
CONFIG_DEFAULTS = {
    "target_modules": None,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "r": 8,
    "lora_alpha": 8,
    "modules_to_save": None,
    "task_type": None,
}


def our_config(**fields):
    assert fields.keys() <= CONFIG_DEFAULTS.keys(), fields
    return SimpleNamespace(**{**CONFIG_DEFAULTS, **fields})


def llama(num_hidden_layers=2):
    config = tiny_llama_config()
    config.num_hidden_layers = num_hidden_layers
    return LlamaForCausalLM(config)


def gpt2():
    return GPT2LMHeadModel(tiny_gpt2_config())


def bert():
    return BertForSequenceClassification(tiny_bert_config())


def decoder_sizes():
    """The tiny Llama's sizes with one layer, for the other decoder-only configs."""
    config = tiny_llama_config()
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return {name: getattr(config, name) for name in names} | {"num_hidden_layers": 1, "pad_token_id": 0}


class TwoLinears(torch.nn.Module):
    """Not a transformers model: "all-linear" keeps its head."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 8)


def peft_injection(model, adapter_name="default", **fields):
    """(peft model, names of the modules holding `adapter_name`, peft's config after injection)."""
    config = peft.LoraConfig(**fields)
    if isinstance(model, peft.PeftModel):
        model.add_adapter(adapter_name, config)
    else:
        model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    names = [
        name
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]
    return model, names, model.peft_config[adapter_name]


def lora_wrapper_names(peft_model):
    return [
        name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, LoraLayer)
    ]


# (module name, target_modules, layers_to_transform, layers_pattern, expected); ValueError where peft's LoraConfig
# rejects the combination.
MATCHING_CASES = [
    ("", [], None, None, False),
    ("", ["foo"], None, None, False),
    ("foo", [], None, None, False),
    ("foo", ["foo"], None, None, True),
    ("foo", ["bar"], None, None, False),
    ("foo", ["foo", "bar"], None, None, True),
    # a str is a regex for the whole name
    ("foo", "foo", None, None, True),
    ("foo", ".*oo", None, None, True),
    ("foo", "fo.*", None, None, True),
    ("foo", ".*bar.*", None, None, False),
    ("foobar", ".*oba.*", None, None, True),
    ("model.layers.0.q_proj", "q_proj", None, None, False),
    ("model.layers.0.q_proj", r".*\.q_proj", None, None, True),
    # a list entry matches whole trailing segments only
    ("model.layers.0.q_proj", ["proj"], None, None, False),
    ("model.layers.0.q_proj", ["0.q_proj"], None, None, True),
    ("model.layers.0.q_proj", ["model.layers.0.q_proj"], None, None, True),
    ("transformer.h.1.attn.attention.q_proj.foo", ["q_proj"], None, None, False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], None, None, True),
    ("transformer.h.1.attn.attention.resid_dropout", ["q_proj", "v_proj"], None, None, False),
    # layers_to_transform with layers_pattern
    ("foo.bar.1.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz"], [0], ["bar"], False),
    ("foo.bar.10.baz", ["baz"], [1], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [0, 1, 2], ["bar"], True),
    ("foo.bar.1.baz", ["baz", "spam"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz"], 1, "bar", True),
    ("foo.bar.001.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.spam.2.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.2.spam.1.baz", ["baz"], [1], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [1], ["foo"], False),
    ("foo.bar.1.baz", ["baz"], [1], ["baz"], False),
    ("bar.1.baz", ["baz"], [1], ["bar"], True),
    ("foobar.1.baz", ["baz"], [1], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [1], ["bar", "spam"], True),
    ("foo.spam.1.baz", ["baz"], [1], ["bar", "spam"], True),
    ("foo.eggs.1.baz", ["baz"], [1], ["bar", "spam"], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [1], ["h"], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0], ["h"], False),
    # an exact full name is taken whatever the layer
    ("foo.bar.1.baz", ["foo.bar.1.baz"], [0], ["bar"], True),
    # layers_to_transform without a pattern: the first number with two segments before it
    ("foo.whatever.1.baz", ["baz"], [1], None, True),
    ("foo.whatever.1.baz", ["baz"], [0], None, False),
    ("foo.whatever.1.baz", ["baz"], [1], [], True),
    ("foo.whatever.1.baz", ["baz"], [1], "", True),
    ("layers.1.baz", ["baz"], [1], None, False),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [1], None, True),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [0], None, False),
    ("foo.bar.1.baz", ["baz"], [], None, True),
    # combinations peft's LoraConfig rejects
    ("foo.bar.1.baz", ".*baz", [1], None, ValueError),
    ("foo.bar.1.baz", ".*baz", None, "bar", ValueError),
    ("foo.bar.1.baz", ".*baz", None, [], ValueError),
    ("foo.bar.1.baz", ["baz"], None, ["bar"], ValueError),
]


@pytest.mark.parametrize(
    "module_name, target_modules, layers_to_transform, layers_pattern, expected", MATCHING_CASES
)
def test_is_targeted_agrees_with_peft_on_the_case_table(
    module_name, target_modules, layers_to_transform, layers_pattern, expected
):
    fields = {
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
    }
    if expected is ValueError:
        with pytest.raises(ValueError):
            peft.LoraConfig(**fields)
        with pytest.raises(ValueError, match="layers_"):
            is_targeted(module_name, our_config(**fields))
        return
    assert bool(check_target_module_exists(peft.LoraConfig(**fields), module_name)) is expected
    assert is_targeted(module_name, our_config(**fields)) is expected


SEGMENTS = ["model", "layers", "h", "0", "1", "2", "10", "attn", "mlp", "q_proj", "v_proj", "proj"]
REGEXES = [
    r".*q_proj",
    r".*\.1\..*",
    r"model\.layers\.0\.q_proj",
    r".*(q|v)_proj",
    "q_proj",
    r"(?!.*mlp).*proj",
]


@st.composite
def matching_problems(draw):
    """A module name and config fields whose list entries are often trailing segments of that name."""
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
    trailing = [".".join(segments[start:]) for start in range(len(segments))]
    entry = st.one_of(
        st.sampled_from(trailing), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=2).map(".".join)
    )
    names = st.one_of(st.lists(entry, max_size=3), st.sampled_from(REGEXES))
    fields = {"target_modules": draw(names), "exclude_modules": draw(st.one_of(st.none(), names))}
    if draw(st.booleans()):
        fields["layers_to_transform"] = draw(
            st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 10), max_size=3))
        )
        fields["layers_pattern"] = draw(
            st.one_of(
                st.none(),
                st.sampled_from(["layers", "h"]),
                st.lists(st.sampled_from(["layers", "h", "model"]), max_size=2),
            )
        )
    return ".".join(segments), fields


@settings(max_examples=500, deadline=None)
@given(problem=matching_problems())
def test_is_targeted_agrees_with_peft_on_random_names(problem):
    module_name, fields = problem
    try:
        peft_config = peft.LoraConfig(**fields)
    except ValueError:
        with pytest.raises(ValueError):
            is_targeted(module_name, our_config(**fields))
        return
    assert is_targeted(module_name, our_config(**fields)) == bool(
        check_target_module_exists(peft_config, module_name)
    )


@pytest.mark.parametrize(
    "exclude_modules, excluded",
    [
        (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["layers.1.self_attn.v_proj"], ["model.layers.1.self_attn.v_proj"]),
        (r".*\.0\..*", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
        ("v_proj", []),  # a str is a whole-name regex
    ],
)
def test_exclude_modules_removes_matching_names_before_targets(exclude_modules, excluded):
    config = our_config(target_modules=["q_proj", "v_proj"], exclude_modules=exclude_modules)
    names = [name for name, _ in llama().named_modules() if name.endswith(("q_proj", "v_proj"))]
    assert [name for name in names if not is_targeted(name, config)] == excluded


@pytest.mark.parametrize(
    "build, task_type",
    [(llama, None), (gpt2, None), (bert, "SEQ_CLS"), (TwoLinears, None)],
    ids=["llama", "gpt2-conv1d", "bert-seq-cls", "plain-module"],
)
def test_all_linear_targets_equal_what_peft_writes_into_the_config(build, task_type):
    _, _, peft_config = peft_injection(build(), target_modules="all-linear", task_type=task_type)
    assert all_linear_targets(build(), task_type) == peft_config.target_modules


def test_all_linear_leaves_out_the_output_embedding_and_the_classifier():
    assert "lm_head" not in all_linear_targets(llama())
    assert "lm_head" in all_linear_targets(TwoLinears())
    assert "classifier" not in all_linear_targets(bert(), "SEQ_CLS")
    assert "classifier" in all_linear_targets(bert())


def test_all_linear_on_a_wrapped_model_takes_the_wrappers_but_nothing_inside_them():
    peft_model, _, _ = peft_injection(llama(), target_modules=["q_proj", "v_proj"])
    ours = all_linear_targets(peft_model.base_model.model)
    _, _, peft_config = peft_injection(peft_model, "other", target_modules="all-linear")
    assert ours == peft_config.target_modules
    assert "model.layers.0.self_attn.q_proj" in ours


def test_all_linear_is_the_same_before_and_after_modules_are_wrapped():
    peft_model, _, peft_config = peft_injection(bert(), target_modules="all-linear", task_type="SEQ_CLS")
    assert all_linear_targets(peft_model.base_model.model, "SEQ_CLS") == peft_config.target_modules
    model = bert()  # modules to save wrapped before "all-linear" is resolved, as lora_engine's tuner does
    model.classifier = ModulesToSaveWrapper(model.classifier, "default")
    model.bert.pooler.dense = ModulesToSaveWrapper(model.bert.pooler.dense, "default")
    assert all_linear_targets(model, "SEQ_CLS") == peft_config.target_modules


# (model builder, config fields) for find_targets versus the modules peft wraps.
FIND_CASES = {
    "llama-list": (llama, {"target_modules": ["q_proj", "v_proj"]}),
    "llama-regex": (llama, {"target_modules": r".*\.(k|o)_proj"}),
    "llama-all-linear": (llama, {"target_modules": "all-linear"}),
    "llama-layers-pattern": (
        llama,
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    "llama-layer-int-no-pattern": (llama, {"target_modules": ["up_proj"], "layers_to_transform": 0}),
    "llama-exclude-list": (
        llama,
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]},
    ),
    "llama-exclude-regex": (
        llama,
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.0\..*"},
    ),
    "llama-default": (llama, {}),
    "llama-modules-to-save": (
        llama,
        {"target_modules": ["q_proj", "up_proj", "lm_head"], "modules_to_save": ["mlp"]},
    ),
    "gpt2-default": (gpt2, {}),
    "gpt2-list": (gpt2, {"target_modules": ["c_proj"]}),
    "gpt2-all-linear": (gpt2, {"target_modules": "all-linear"}),
    "bert-default": (bert, {}),
    "bert-inside-module-to-save": (bert, {"target_modules": ["dense"], "modules_to_save": ["pooler"]}),
    "bert-seq-cls-all-linear": (bert, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("build, fields", FIND_CASES.values(), ids=FIND_CASES.keys())
def test_find_targets_wraps_what_peft_wraps_and_resolves_the_config_alike(build, fields):
    _, peft_names, peft_config = peft_injection(build(), **fields)
    config = our_config(**fields)
    assert find_targets(build(), config) == peft_names
    if isinstance(peft_config.target_modules, str):
        assert config.target_modules == peft_config.target_modules
    else:
        assert set(config.target_modules) == peft_config.target_modules


def test_find_targets_resolves_all_linear_in_any_case_into_the_config():
    config = our_config(target_modules="ALL-Linear")
    targets = find_targets(llama(), config)
    assert config.target_modules == set(targets) == all_linear_targets(llama())


@pytest.mark.parametrize(
    "target_modules",
    [
        "all-linear",
        [f"model.layers.{i}.{kind}" for i in range(10) for kind in ("self_attn.q_proj", "mlp.up_proj")],
    ],
    ids=["all-linear", "list-of-full-names"],
)
def test_long_target_lists_are_shortened_to_the_suffixes_peft_saves(target_modules):
    _, peft_names, peft_config = peft_injection(llama(num_hidden_layers=10), target_modules=target_modules)
    config = our_config(target_modules=target_modules)
    assert find_targets(llama(num_hidden_layers=10), config) == peft_names
    assert config.target_modules == peft_config.target_modules
    assert len(config.target_modules) < 20


def test_find_targets_on_a_wrapped_model_may_target_wrappers_but_never_their_insides():
    peft_model, _, _ = peft_injection(llama(), target_modules=["q_proj", "v_proj"])
    wrappers = lora_wrapper_names(peft_model)
    config = our_config(target_modules=r".*q_proj.*")
    ours = find_targets(peft_model.base_model.model, config, skip_within=wrappers)
    _, peft_names, _ = peft_injection(peft_model, "other", target_modules=r".*q_proj.*")
    assert ours == peft_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_find_targets_all_linear_on_a_wrapped_model_targets_existing_wrappers_again():
    peft_model, _, _ = peft_injection(llama(), target_modules=["q_proj", "v_proj"])
    config = our_config(target_modules="all-linear")
    ours = find_targets(peft_model.base_model.model, config, skip_within=lora_wrapper_names(peft_model))
    _, peft_names, _ = peft_injection(peft_model, "other", target_modules="all-linear")
    assert ours == peft_names


def test_rank_and_alpha_take_the_first_matching_key_each_on_its_own():
    fields = {
        "target_modules": ["q_proj", "v_proj"],
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"q_proj": 4, "layers.0.self_attn.q_proj": 2, r"layers\.1\..*v_proj": 6},
        "alpha_pattern": {"model.layers.0.self_attn.q_proj": 32, ".*_proj": 3},
    }
    peft_model, _, _ = peft_injection(llama(), **fields)
    peft_values = {
        name: (module.r["default"], module.lora_alpha["default"])
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }
    config = our_config(**fields)
    ours = {name: rank_and_alpha(name, config) for name in find_targets(llama(), config)}
    assert ours == peft_values
    assert ours == {
        "model.layers.0.self_attn.q_proj": (4, 32.0),
        "model.layers.0.self_attn.v_proj": (8, 3.0),
        "model.layers.1.self_attn.q_proj": (4, 3.0),
        "model.layers.1.self_attn.v_proj": (6, 3.0),
    }


def test_rank_and_alpha_fall_back_to_r_and_lora_alpha():
    assert rank_and_alpha("model.layers.0.mlp.up_proj", our_config(r=16, lora_alpha=24)) == (16, 24.0)


def test_pattern_keys_that_match_no_target_warn_naming_them():
    fields = {
        "target_modules": ["q_proj"],
        "rank_pattern": {"proj": 2, "q_proj": 4},
        "alpha_pattern": {"v_proj": 1},
    }
    with pytest.warns(RuntimeWarning, match=r"rank_pattern.*\['proj'\]"):
        peft_injection(llama(), **fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_targets(llama(), our_config(**fields))
    messages = [str(warning.message) for warning in caught]
    assert any("rank_pattern" in message and "['proj']" in message for message in messages)
    assert any("alpha_pattern" in message and "['v_proj']" in message for message in messages)


def test_is_module_to_save_is_peft_suffix_rule_without_a_dot_boundary():
    modules_to_save = ["lm_head", "norm"]
    peft_model, _, _ = peft_injection(llama(), target_modules=["q_proj"], modules_to_save=modules_to_save)
    peft_wrapped = [
        name
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    ]
    ours = [name for name, _ in llama().named_modules() if is_module_to_save(name, modules_to_save)]
    assert ours == peft_wrapped
    assert "model.layers.0.input_layernorm" in ours
    assert not is_module_to_save("lm_head", None)


def test_modules_to_save_and_everything_inside_them_are_never_targeted():
    config = our_config(target_modules=["q_proj", "up_proj", "lm_head"], modules_to_save=["lm_head", "mlp"])
    targets = find_targets(llama(), config)
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_default_targets_equal_peft_table_for_every_model_type_peft_lists():
    for model_type, targets in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items():
        if not isinstance(targets, str):
            assert default_target_modules(model_type) == targets, model_type


@pytest.mark.parametrize(
    "build",
    [
        lambda: Phi3ForCausalLM(Phi3Config(**decoder_sizes())),
        lambda: DistilBertModel(
            DistilBertConfig(vocab_size=VOCAB_SIZE, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
        ),
        lambda: SmolLM3ForCausalLM(SmolLM3Config(**decoder_sizes())),
    ],
    ids=["phi3", "distilbert", "smollm3"],
)
def test_defaults_beyond_peft_table_name_modules_of_that_model(build):
    model = build()
    config = our_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        targets = find_targets(model, config)
    assert config.target_modules == set(default_target_modules(model.config.model_type))
    assert {name.rsplit(".", 1)[-1] for name in targets} == config.target_modules


def test_unknown_model_type_asks_for_target_modules_naming_the_type():
    with pytest.raises(ValueError, match=r"'my_arch': target_modules must be given"):
        default_target_modules("my_arch")
    model = TwoLinears()
    model.config = SimpleNamespace(model_type="my_arch")
    with pytest.raises(ValueError, match="my_arch"):
        find_targets(model, our_config())


def test_no_match_names_the_targets_and_the_entries_that_name_nothing():
    with pytest.raises(ValueError, match=r"\['qproj', 'vproj'\].*name no module"):
        find_targets(llama(), our_config(target_modules=["qproj", "vproj"]))


def test_no_match_for_a_str_target_says_it_is_a_whole_name_regex():
    with pytest.raises(ValueError, match=r"target_modules='q_proj'.*regex"):
        find_targets(llama(), our_config(target_modules="q_proj"))


def test_no_match_when_exclude_modules_removed_everything_says_so():
    with pytest.raises(ValueError, match=r"exclude_modules=\['q_proj'\] removed every module"):
        find_targets(llama(), our_config(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_no_match_when_no_layer_is_selected_names_layers_to_transform():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\]"):
        find_targets(llama(), our_config(target_modules=["q_proj"], layers_to_transform=[7]))


def test_unmatched_list_entries_warn_naming_them_while_the_rest_is_targeted():
    _, peft_names, _ = peft_injection(llama(), target_modules=["q_proj", "vproj"])
    with pytest.warns(RuntimeWarning, match=r"\['vproj'\]"):
        targets = find_targets(llama(), our_config(target_modules=["q_proj", "vproj"]))
    assert targets == peft_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_exclude_modules_that_exclude_nothing_warn():
    with pytest.warns(RuntimeWarning, match=r"exclude_modules=\['oproj'\]"):
        find_targets(llama(), our_config(target_modules=["q_proj"], exclude_modules=["oproj"]))
