"""peft's public names and import paths: the import-line switch works for the top level and for the deep imports
user code writes; a peft name that is not LoRA raises an ImportError that says so."""

import subprocess
import sys

import peft
import peft.tuners.lora
import peft.tuners.tuners_utils
import peft.utils
import pytest
import torch
from torch import nn

import lora_engine
from lora_engine.peft_names import UNSUPPORTED, UnsupportedPeftName


@pytest.mark.parametrize("name", peft.__all__)
def test_every_peft_top_level_name_exists_or_says_why_not(name):
    if name in UNSUPPORTED:
        with pytest.raises(UnsupportedPeftName, match=f"peft's {name} is .*lora_engine"):
            getattr(lora_engine, name)
    else:
        assert getattr(lora_engine, name) is not None


def test_the_names_we_refuse_are_all_peft_names():
    # Refusing a name peft does not have would be a typo in our table (names of peft.utils / peft.tuners.lora too).
    known = set(peft.__all__) | set(dir(peft.utils)) | set(dir(peft.tuners.lora))
    assert sorted(set(UNSUPPORTED) - known) == []


def test_from_import_of_another_method_raises_saying_lora_only():
    with pytest.raises(ImportError, match="peft's IA3Config is another PEFT method than LoRA \\(IA3\\)"):
        from lora_engine import IA3Config  # noqa: F401


def test_from_import_of_an_unsupported_lora_init_names_it():
    with pytest.raises(ImportError, match="LoraGAConfig is a LoRA initialization \\(LoRA-GA\\)"):
        from lora_engine import LoraGAConfig  # noqa: F401


def test_unknown_name_is_a_plain_attribute_error():
    assert not hasattr(lora_engine, "no_such_name")
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):
        from lora_engine import no_such_name  # noqa: F401


def test_prompt_learning_config_is_a_class_no_config_of_ours_is_an_instance_of():
    assert issubclass(lora_engine.PromptLearningConfig, lora_engine.PeftConfig)
    assert not isinstance(lora_engine.LoraConfig(), lora_engine.PromptLearningConfig)
    with pytest.raises(ImportError, match="lora_engine implements LoRA only"):
        lora_engine.PromptLearningConfig()


def test_deep_imports_have_counterparts_at_the_same_path():
    from lora_engine.tuners.lora import Linear, LoraConfig, LoraLayer, LoraModel
    from lora_engine.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
    from lora_engine.utils import get_peft_model_state_dict, hotswap, set_peft_model_state_dict

    assert LoraConfig is lora_engine.LoraConfig and LoraModel is lora_engine.LoraModel
    assert issubclass(Linear, LoraLayer) and BaseTunerLayer is LoraLayer
    assert get_peft_model_state_dict is lora_engine.get_peft_model_state_dict
    assert set_peft_model_state_dict is lora_engine.set_peft_model_state_dict
    assert callable(hotswap.hotswap_adapter) and callable(hotswap.prepare_model_for_compiled_hotswap)
    assert callable(check_target_module_exists)


def test_deep_import_of_another_method_raises_saying_lora_only():
    with pytest.raises(ImportError, match="peft's AdaLoraModel is another PEFT method"):
        from lora_engine.tuners import AdaLoraModel  # noqa: F401
    with pytest.raises(ImportError, match="peft's TrainableTokensWrapper is another PEFT method"):
        from lora_engine.utils import TrainableTokensWrapper  # noqa: F401


def test_deep_import_names_find_the_same_layers_as_peft(llama_factory):
    from lora_engine.tuners.lora import Linear
    from lora_engine.tuners.tuners_utils import BaseTunerLayer

    config = dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(llama_factory(), peft.LoraConfig(**config))
    ours = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**config))
    for their_class, our_class in (
        (peft.tuners.tuners_utils.BaseTunerLayer, BaseTunerLayer),
        (peft.tuners.lora.Linear, Linear),
    ):
        expected = [name for name, module in theirs.named_modules() if isinstance(module, their_class)]
        assert [name for name, module in ours.named_modules() if isinstance(module, our_class)] == expected


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
        "lm_head",
    ],
)
def test_check_target_module_exists_agrees_with_peft(key):
    config = dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers")
    expected = bool(peft.tuners.tuners_utils.check_target_module_exists(peft.LoraConfig(**config), key))
    from lora_engine.tuners.tuners_utils import check_target_module_exists

    assert check_target_module_exists(lora_engine.LoraConfig(**config), key) is expected


def test_no_matching_module_raises_peft_s_error_class(llama_factory):
    with pytest.raises(lora_engine.NoMatchingPeftModuleError) as error:
        lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(target_modules=["nothing_here"]))
    assert isinstance(error.value, ValueError) and isinstance(error.value, lora_engine.PeftError)


def test_get_peft_config_builds_the_lora_config_like_peft():
    config_dict = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "lora_alpha": 16}
    ours, theirs = lora_engine.get_peft_config(dict(config_dict)), peft.get_peft_config(dict(config_dict))
    assert type(ours) is lora_engine.LoraConfig
    assert (ours.r, ours.lora_alpha, ours.target_modules) == (
        theirs.r,
        theirs.lora_alpha,
        theirs.target_modules,
    )
    with pytest.raises(ValueError, match="peft_type='IA3' is not supported"):
        lora_engine.get_peft_config({"peft_type": "IA3"})


def test_peft_type_registries_map_lora_to_our_classes():
    assert lora_engine.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is lora_engine.LoraConfig
    assert lora_engine.PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is lora_engine.LoraModel
    assert lora_engine.MODEL_TYPE_TO_PEFT_MODEL_MAPPING["CAUSAL_LM"] is lora_engine.PeftModelForCausalLM


def test_load_peft_weights_equals_peft(llama_factory, tmp_path):
    model = lora_engine.get_peft_model(
        llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    ours, theirs = (
        lora_engine.load_peft_weights(tmp_path),
        peft.load_peft_weights(str(tmp_path), device="cpu"),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_base_model_state_dict_equals_peft(llama_factory):
    config = dict(
        target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    theirs = peft.get_peft_model(llama_factory(), peft.LoraConfig(**config))
    ours = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**config))
    expected = peft.get_base_model_state_dict(theirs)
    state = lora_engine.get_base_model_state_dict(ours)
    assert state.keys() == expected.keys() == llama_factory().state_dict().keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_set_base_model_state_dict_loads_original_keys_and_leaves_adapters(llama_factory, input_ids):
    ours = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"]))
    adapters = {key: value.clone() for key, value in ours.state_dict().items() if "lora_" in key}
    result = lora_engine.set_base_model_state_dict(ours, llama_factory(seed=5).state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, llama_factory(seed=5)(input_ids).logits)
    assert all(torch.equal(ours.state_dict()[key], value) for key, value in adapters.items())
    with pytest.raises(RuntimeError, match="Unexpected key\\(s\\) in state_dict: \\['extra'\\]"):
        lora_engine.set_base_model_state_dict(ours, {**llama_factory().state_dict(), "extra": torch.zeros(1)})


def test_cast_mixed_precision_params_equals_peft(llama_factory):
    theirs = peft.get_peft_model(llama_factory(), peft.LoraConfig(target_modules=["q_proj"]))
    ours = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(target_modules=["q_proj"]))
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    lora_engine.cast_mixed_precision_params(ours, torch.bfloat16)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {
        k: v.dtype for k, v in theirs.state_dict().items()
    }


def test_shift_tokens_right_equals_peft():
    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, 10]])
    expected = peft.shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=1)
    assert torch.equal(
        lora_engine.shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=1), expected
    )


def test_status_functions_are_peft_s_on_the_top_level():
    from lora_engine.status import get_layer_status, get_model_status

    assert (
        lora_engine.get_layer_status is get_layer_status and lora_engine.get_model_status is get_model_status
    )


def test_importing_lora_engine_and_its_peft_paths_does_not_import_peft():
    code = (
        "import sys, lora_engine, lora_engine.utils, lora_engine.utils.hotswap, lora_engine.tuners.lora, "
        "lora_engine.tuners.tuners_utils, lora_engine.auto; print('peft' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ lora_engine.tuners.lora
PEFT_TUNERS_LORA_NAMES = sorted(name for name in dir(peft.tuners.lora) if not name.startswith("_"))


@pytest.mark.parametrize("name", PEFT_TUNERS_LORA_NAMES)
def test_every_peft_tuners_lora_name_is_ours_or_refused_saying_why(name):
    import lora_engine.tuners.lora as ours

    if name in ours.__all__:
        assert getattr(ours, name) is not None
    else:
        with pytest.raises(
            UnsupportedPeftName, match=f"peft's .*{name} is .*so lora_engine.tuners.lora has no"
        ):
            getattr(ours, name)


class EveryKind(nn.Module):
    """One module of each kind peft's LoRA layer classes wrap (no forward: only the wrapping is compared)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv2d = nn.Conv2d(4, 6, 3)
        self.conv3d = nn.Conv3d(4, 6, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 6)


def _wrapped_by_class(use_dora: bool) -> list[tuple[str, set[str], set[str]]]:
    """``(peft class name, modules peft's class finds, modules ours finds)`` for every layer class."""
    import lora_engine.tuners.lora as ours

    targets = ["conv1d", "conv2d", "conv3d", "embed", "linear", *([] if use_dora else ["attn"])]
    models = [
        library.get_peft_model(
            EveryKind(), library.LoraConfig(target_modules=targets, r=2, use_dora=use_dora)
        )
        for library in (peft, lora_engine)
    ]
    their_classes = {
        name: getattr(peft.tuners.lora, name, None) or getattr(peft.tuners.lora.layer, name)
        for name in ("Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraLayer", "MultiheadAttention")
    }
    found = []
    for name, their_class in their_classes.items():
        our_class = getattr(ours, name)
        theirs, mine = (
            {module_name for module_name, module in model.named_modules() if isinstance(module, cls)}
            for model, cls in zip(models, (their_class, our_class))
        )
        found.append((name, theirs, mine))
    return found


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_tuners_lora_layer_classes_find_the_modules_peft_classes_find(use_dora):
    for name, theirs, ours in _wrapped_by_class(use_dora):
        # peft nests a LoRA Linear in its attention wrapper (base_layer.out_proj); we hold those factors inline.
        theirs = {module for module in theirs if "attn.base_layer.out_proj" not in module}
        assert ours == theirs, name
        assert ours or (name == "MultiheadAttention" and use_dora), name


def test_conv_classes_are_views_of_our_one_conv_wrapper_for_isinstance_only():
    from lora_engine.layers.conv import LoraConv
    from lora_engine.tuners.lora import Conv1d, Conv2d, LoraLayer

    assert issubclass(Conv2d, LoraConv) and issubclass(Conv2d, LoraLayer)
    model = lora_engine.get_peft_model(EveryKind(), lora_engine.LoraConfig(target_modules=["conv1d"], r=2))
    wrapper = model.get_base_model().conv1d
    assert isinstance(wrapper, Conv1d) and not isinstance(wrapper, Conv2d)
    with pytest.raises(TypeError, match="Conv2d is for isinstance checks"):
        Conv2d(nn.Conv2d(4, 6, 3))


def test_param_wrapper_finds_the_module_whose_parameter_peft_wraps():
    from transformers import MixtralConfig, MixtralForCausalLM

    from lora_engine.tuners.lora import ParamWrapper

    def make_moe():
        config = MixtralConfig(
            vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return MixtralForCausalLM(config)

    # One targeted parameter: peft's one wrapper per parameter and our one per module then coincide.
    config = {"target_modules": [], "target_parameters": ["experts.down_proj"], "r": 2}
    found = [
        {name for name, module in model.named_modules() if isinstance(module, cls)}
        for model, cls in (
            (peft.get_peft_model(make_moe(), peft.LoraConfig(**config)), peft.tuners.lora.ParamWrapper),
            (lora_engine.get_peft_model(make_moe(), lora_engine.LoraConfig(**config)), ParamWrapper),
        )
    ]
    assert found[0] == found[1] == {"base_model.model.model.layers.0.mlp.experts"}
