"""save_pretrained writes peft's model card README.md: the same card peft 0.21.2 writes for the same model, and an
existing README.md is updated as peft updates it (its own text and metadata kept)."""

import peft
import torch
from transformers import LlamaForCausalLM

import lora_engine

CONFIG = dict(target_modules=["q_proj"], task_type="CAUSAL_LM")
USER_README = "---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n"


def save_both(llama_factory, tmp_path, readme=None, **config):
    folders = {}
    for library in (peft, lora_engine):
        folder = tmp_path / library.__name__
        if readme is not None:
            folder.mkdir()
            (folder / "README.md").write_text(readme)
        library.get_peft_model(llama_factory(), library.LoraConfig(**{**CONFIG, **config})).save_pretrained(
            folder
        )
        folders[library.__name__] = folder
    return folders["peft"], folders["lora_engine"]


def test_new_card_equals_peft(llama_factory, tmp_path):
    theirs, ours = save_both(llama_factory, tmp_path)
    assert (ours / "README.md").read_text() == (theirs / "README.md").read_text()
    assert "library_name: peft" in (ours / "README.md").read_text()


def test_card_of_a_model_loaded_from_a_folder_names_its_base_like_peft(llama_factory, tmp_path):
    torch.manual_seed(0)
    llama_factory().save_pretrained(tmp_path / "base")
    folders = []
    for library in (peft, lora_engine):
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        folder = tmp_path / library.__name__
        library.get_peft_model(base, library.LoraConfig(target_modules=["q_proj"])).save_pretrained(folder)
        folders.append(folder)
    theirs, ours = ((folder / "README.md").read_text() for folder in folders)
    assert ours == theirs
    assert f"base_model: {tmp_path / 'base'}" in ours


def test_existing_readme_is_updated_like_peft(llama_factory, tmp_path):
    theirs, ours = save_both(llama_factory, tmp_path, readme=USER_README)
    card = (ours / "README.md").read_text()
    assert card == (theirs / "README.md").read_text()
    assert "license: mit" in card and "Trained on my data." in card


def test_saving_twice_adds_the_framework_block_once(llama_factory, tmp_path):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text().count("- PEFT 0.21.2") == 1


def test_only_the_main_process_writes_the_card(llama_factory, tmp_path):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out" / "README.md").exists()
