"""TRL's SFTTrainer and DPOTrainer train a lora_engine model exactly as they train a peft model.

Each test runs the same script twice, with peft (the oracle) and with lora_engine: a tiny Llama built from a config,
a word-level tokenizer built in memory, 3 optimizer steps. The model is either wrapped before the trainer sees it,
or wrapped by the trainer from ``peft_config=LoraConfig(...)``.
"""

import datasets
import peft
import pytest
import torch
from conftest import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import lora_engine

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


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
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


def _base() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config())


def _train(library, kind: str, wrap_first: bool, output_dir):
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
            model, peft_config = library.get_peft_model(_base(), lora), None
        else:
            model, peft_config = _base(), lora
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=data(),
            processing_class=_tokenizer(),
            peft_config=peft_config,
        )
        trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(library, kind, wrap_first)``: the trainer after training, each script run once per module."""
    runs = {}

    def run(library, kind: str, wrap_first: bool):
        key = (library.__name__, kind, wrap_first)
        if key not in runs:
            runs[key] = _train(library, kind, wrap_first, tmp_path_factory.mktemp("_".join(map(str, key))))
        return runs[key]

    return run


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("wrap_first", [True, False], ids=["wrapped_model", "peft_config"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainer_steps_match_peft(trained, kind, wrap_first):
    expected, actual = trained(peft, kind, wrap_first), trained(lora_engine, kind, wrap_first)

    assert isinstance(actual.model, lora_engine.PeftModel)
    assert len(_losses(expected)) == 3
    assert _losses(actual) == pytest.approx(_losses(expected), rel=1e-5)
    ours, theirs = _adapter(actual.model), _adapter(expected.model)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("wrap_first", [True, False], ids=["wrapped_model", "peft_config"])
def test_dpo_reference_is_the_policy_without_its_adapter_not_a_second_base(trained, wrap_first):
    expected, actual = trained(peft, "dpo", wrap_first), trained(lora_engine, "dpo", wrap_first)

    assert actual.ref_model is None and expected.ref_model is None
    base_parameters = sum(param.numel() for param in _base().parameters())
    in_memory = sum(param.numel() for param in actual.model.parameters())
    assert in_memory == sum(param.numel() for param in expected.model.parameters())
    adapters = sum(param.numel() for param in _adapter(actual.model).values())
    assert in_memory == base_parameters + adapters  # one base, not a second copy for the reference
    # An already-wrapped model keeps a frozen copy of its starting adapter as the reference, as TRL does for peft.
    assert ("ref" in actual.model.peft_config) == wrap_first
