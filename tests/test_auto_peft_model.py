"""AutoPeftModel*: one call loads the local base model an adapter names, then the adapter; peft 0.21.2's
AutoPeftModel* on the same folders is the oracle. Hub ids get a clear error (we load locally only)."""

import json

import peft
import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import lora_engine

# The same weights give the same logits up to fp32 rounding: the reference sums the same products in another order
# than peft (the low-rank term added by one addmm_, the base product on oneDNN). A wrong or missing weight differs
# by orders of magnitude more.
SAME_WEIGHTS = {"rtol": 1e-5, "atol": 1e-6}


def tiny_t5_config() -> T5Config:
    return T5Config(
        vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )


def tiny_bert_qa_config():
    config = tiny_bert_config()
    config.num_labels = 2  # start and end logits
    return config


# (task_type, base class, base config, target modules, our auto class name)
TASKS = {
    "CAUSAL_LM": (LlamaForCausalLM, tiny_llama_config, ["q_proj", "v_proj"], "AutoPeftModelForCausalLM"),
    "SEQ_CLS": (
        BertForSequenceClassification,
        tiny_bert_config,
        ["query"],
        "AutoPeftModelForSequenceClassification",
    ),
    "TOKEN_CLS": (
        BertForTokenClassification,
        tiny_bert_config,
        ["query"],
        "AutoPeftModelForTokenClassification",
    ),
    "QUESTION_ANS": (
        BertForQuestionAnswering,
        tiny_bert_qa_config,
        ["query"],
        "AutoPeftModelForQuestionAnswering",
    ),
    "FEATURE_EXTRACTION": (BertModel, tiny_bert_config, ["query"], "AutoPeftModelForFeatureExtraction"),
    "SEQ_2_SEQ_LM": (T5ForConditionalGeneration, tiny_t5_config, ["q", "v"], "AutoPeftModelForSeq2SeqLM"),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # peft asks the Hub whether the adapter folder has a tokenizer unless offline mode is set.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_base_and_adapter(tmp_path, task_type):
    """A tiny base saved to tmp_path/base and a non-trivial adapter for it saved to tmp_path/adapter."""
    model_class, make_config, targets, _ = TASKS[task_type]
    torch.manual_seed(0)
    model_class(make_config()).save_pretrained(tmp_path / "base")
    base = model_class.from_pretrained(tmp_path / "base")  # name_or_path is the local folder
    config = lora_engine.LoraConfig(
        target_modules=targets, task_type=task_type if task_type != "NONE" else None, init_lora_weights=False
    )
    lora_engine.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def run(model, task_type):
    input_ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"decoder_input_ids": input_ids[:, :3]} if task_type == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs)[0]


@pytest.mark.parametrize("task_type", TASKS)
def test_auto_class_loads_base_and_adapter_like_peft(tmp_path, task_type):
    adapter_dir = save_base_and_adapter(tmp_path, task_type)
    auto_class_name = TASKS[task_type][3]
    ours = getattr(lora_engine, auto_class_name).from_pretrained(adapter_dir)
    theirs = getattr(peft, auto_class_name).from_pretrained(adapter_dir)
    assert type(ours).__name__ == type(theirs).__name__
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    torch.testing.assert_close(run(ours, task_type), run(theirs, task_type), **SAME_WEIGHTS)


def test_auto_peft_model_without_task_type_builds_the_auto_mapping_class(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    config = lora_engine.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    lora_engine.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    ours = lora_engine.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(ours) is lora_engine.PeftModel
    assert type(ours.get_base_model()) is LlamaForCausalLM
    torch.testing.assert_close(run(ours, "CAUSAL_LM"), run(theirs, "CAUSAL_LM"), **SAME_WEIGHTS)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    frozen = lora_engine.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    trainable = lora_engine.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, is_trainable=True)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_base_model_keywords_reach_the_base_from_pretrained(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    model = lora_engine.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.bfloat16)
    assert model.get_base_model().model.norm.weight.dtype == torch.bfloat16


def test_base_named_by_hub_id_raises_naming_it(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        FileNotFoundError, match="'meta-llama/Llama-2-7b-hf' named in .* is not a local folder"
    ):
        lora_engine.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)


def test_adapter_named_by_hub_id_raises_local_folders_only():
    with pytest.raises(FileNotFoundError, match="'someone/some-adapter' is not a local folder"):
        lora_engine.AutoPeftModelForCausalLM.from_pretrained("someone/some-adapter")


def test_adapter_without_base_model_name_raises(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no base_model_name_or_path"):
        lora_engine.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)


def test_class_that_does_not_fit_the_task_type_raises(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
        lora_engine.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)


def test_plain_auto_peft_model_with_a_task_type_raises(tmp_path):
    adapter_dir = save_base_and_adapter(tmp_path, "CAUSAL_LM")
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        lora_engine.AutoPeftModel.from_pretrained(adapter_dir)


def test_auto_mapping_outside_the_allowlist_raises(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora_engine.get_peft_model(base, lora_engine.LoraConfig(target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    with pytest.raises(
        ValueError, match="'transformers.models.llama.modeling_llama' which is not in the import allowlist"
    ):
        lora_engine.AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["diffusers"])


def test_auto_classes_cannot_be_instantiated_directly():
    with pytest.raises(OSError, match="AutoPeftModelForCausalLM.from_pretrained"):
        lora_engine.AutoPeftModelForCausalLM()
