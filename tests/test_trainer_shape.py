"""PeftModel is shaped for transformers' stock Trainer (the full Trainer support is a later issue)."""

import torch
from conftest import tiny_llama_config
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from lora_engine import LoraConfig, get_peft_model


class _RandomTokens(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        ids = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path, tie_word_embeddings):
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.tie_word_embeddings = tie_word_embeddings
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    return Trainer(model=model, args=args, train_dataset=_RandomTokens())


def test_trainer_finds_the_labels_argument_of_our_forward(tmp_path):
    assert _trainer(tmp_path, tie_word_embeddings=False).label_names == ["labels"]


def test_trainer_saves_only_the_adapter_files_even_with_tied_embeddings(tmp_path):
    trainer = _trainer(tmp_path, tie_word_embeddings=True)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = {path.name for path in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & saved
