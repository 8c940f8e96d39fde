"""The TRL scripts of test_trl.py, importable without peft (a subprocess runs them with peft blocked).

A tiny Llama built from a config, a word-level tokenizer built in memory, 3 optimizer steps; the model is either
wrapped before the trainer sees it, or wrapped by the trainer from ``peft_config=LoraConfig(...)``.
"""

import datasets
import torch
from conftest import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "red",
    "blue",
    "big",
    "small",
    "and",
    "then",
    "quickly",
    "slowly",
    "jumped",
    "slept",
]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS``, built in memory (nothing downloaded)."""
    vocab = {word: index for index, word in enumerate(SPECIAL + WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def _sentences(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 10, (count,), generator=generator)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
        for n in lengths
    ]


def _sft_data() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": _sentences(8)})


def _dpo_data() -> datasets.Dataset:
    sentences = _sentences(12)
    return datasets.Dataset.from_dict(
        {"prompt": sentences[:4], "chosen": sentences[4:8], "rejected": sentences[8:]}
    )


TRAINERS = {"sft": (SFTTrainer, SFTConfig, _sft_data), "dpo": (DPOTrainer, DPOConfig, _dpo_data)}


def base() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config())


def train(library, kind: str, wrap_first: bool, output_dir):
    trainer_class, config_class, data = TRAINERS[kind]
    # Random B (init_lora_weights=False) so that even the first step's loss depends on the adapter.
    lora = library.LoraConfig(
        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=kind == "dpo"
    )
    args = config_class(
        str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if wrap_first:
            model, peft_config = library.get_peft_model(base(), lora), None
        else:
            model, peft_config = base(), lora
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=data(),
            processing_class=tokenizer(),
            peft_config=peft_config,
        )
        trainer.train()
    return trainer


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
