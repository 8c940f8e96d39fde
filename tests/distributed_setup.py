"""The model and rows that test_distributed.py and its worker processes (distributed_worker.py) both build."""

import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

import lora_engine

GLOBAL_BATCH = 4
STEPS = 3


def lora_model() -> lora_engine.PeftModel:
    """A tiny tied Llama with LoRA on q/v and no task_type, identical in every process."""
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        return lora_engine.get_peft_model(base, lora_engine.LoraConfig(target_modules=["q_proj", "v_proj"]))


def token_rows() -> list[dict[str, torch.Tensor]]:
    """``GLOBAL_BATCH * STEPS`` rows of 12 fixed tokens, every token a label (so every rank counts as many)."""
    rows = []
    for index in range(GLOBAL_BATCH * STEPS):
        ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(index))
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows
