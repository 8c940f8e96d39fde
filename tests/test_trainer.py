"""transformers' stock Trainer trains, checkpoints, resumes and reloads our PeftModel as it does peft's.

Every test runs the real Trainer on CPU with a tiny Llama whose input and output embeddings are tied (as in
SmolLM2), LoRA on q_proj/v_proj, and fixed token rows whose labels start with -100 prefixes of different lengths.
"""

import logging
import math
from contextlib import contextmanager

import peft
import pytest
import torch
from conftest import copy_lora_weights, tiny_llama_config
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import lora_engine

TARGETS = ["q_proj", "v_proj"]


class _TokenRows(Dataset):
    """Row ``i``: 12 fixed random tokens; its first ``i % 4`` labels are -100, so rows count different tokens."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(index))
        labels = ids.clone()
        labels[: index % 4] = -100
        return {"input_ids": ids, "labels": labels}


def _tied_llama(seed: int = 0) -> LlamaForCausalLM:
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _lora(library=lora_engine, lora_seed: int = 0):
    """The tied base of seed 0 with LoRA adapters whose random init comes from ``lora_seed``."""
    base = _tied_llama()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed)
        return library.get_peft_model(base, library.LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM"))


def _trainer(model, output_dir, eval_dataset=None, **overrides) -> Trainer:
    settings = dict(
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        use_cpu=True,
        report_to=[],
    )
    settings.update(overrides)
    args = TrainingArguments(str(output_dir), **settings)
    return Trainer(model=model, args=args, train_dataset=_TokenRows(), eval_dataset=eval_dataset)


@contextmanager
def _trainer_warnings():
    """The messages transformers logs at WARNING or above inside the block (its loggers do not propagate)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        yield messages
    finally:
        library_logger.removeHandler(handler)


def _history(trainer: Trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def _assert_same_tensors(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key, **tolerance)


def test_checkpoint_folder_holds_the_adapter_files_and_no_second_copy_of_the_weights(tmp_path):
    # A model.safetensors beside the adapter files would be what the Trainer resumes from, written apart from the
    # config/weights pair (a kill between the two saves would tear the checkpoint). Resuming and best-model
    # reloading both read the pair, as for peft.
    model = _lora()
    _trainer(model, tmp_path, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert (
        not {"model.safetensors", "config.json", "pytorch_model.bin", "model.safetensors.index.json"} & saved
    )
    saved_keys = load_file(checkpoint / "adapter_model.safetensors").keys()
    assert {key.replace(".default.", ".") for key in _trainable(model)} == saved_keys


def test_resume_from_checkpoint_finishes_as_the_uninterrupted_run(tmp_path):
    straight = _lora()
    straight_trainer = _trainer(
        straight, tmp_path / "straight", max_steps=6, save_strategy="steps", save_steps=2
    )
    straight_trainer.train()

    # Different LoRA init: only the checkpoint can make the resumed run match.
    resumed = _lora(lora_seed=1)
    resumed_trainer = _trainer(
        resumed, tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=2
    )
    with _trainer_warnings() as warnings:
        resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))

    assert len(_history(straight_trainer, "loss")) == 6
    assert _history(resumed_trainer, "loss") == _history(straight_trainer, "loss")
    _assert_same_tensors(_trainable(resumed), _trainable(straight), rtol=0, atol=0)
    # The frozen tensors are absent from the checkpoint on purpose: the Trainer must not report them missing.
    assert not [message for message in warnings if "missing keys" in message]


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path):
    model = _lora()
    trainer = _trainer(
        model,
        tmp_path,
        eval_dataset=_TokenRows(),
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        # Best = highest eval loss = an early checkpoint, so that reloading it visibly changes the weights.
        greater_is_better=True,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    adapter = load_file(f"{best}/adapter_model.safetensors")
    _assert_same_tensors(lora_engine.get_peft_model_state_dict(model), adapter, rtol=0, atol=0)


def test_gradient_accumulation_gives_the_losses_and_updates_of_one_big_batch(tmp_path):
    # SGD, so that updates are proportional to gradients (Adam would hide a wrongly scaled gradient).
    runs = {}
    for batch_size, accumulation in ((4, 1), (1, 4)):
        model = _lora()
        trainer = _trainer(
            model,
            tmp_path / f"bs{batch_size}",
            optim="sgd",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        runs[batch_size] = (_history(trainer, "loss"), _history(trainer, "grad_norm"), _trainable(model))
    (big_losses, big_norms, big_weights), (small_losses, small_norms, small_weights) = runs[4], runs[1]
    assert small_losses == pytest.approx(big_losses, rel=1e-5)
    assert small_norms == pytest.approx(big_norms, rel=1e-4)
    _assert_same_tensors(small_weights, big_weights, rtol=1e-5, atol=1e-6)


def test_tied_embedding_checkpoint_loads_in_peft_with_identical_logits(tmp_path):
    model = _lora()
    _trainer(model, tmp_path, save_strategy="steps", save_steps=2).train()
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight

    loaded = peft.PeftModel.from_pretrained(_tied_llama(), str(tmp_path / "checkpoint-2"))
    input_ids = _TokenRows()[0]["input_ids"][None]
    with torch.no_grad():
        expected = loaded.eval()(input_ids=input_ids).logits
        actual = model.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_trains_every_adapter_with_frozen_embeddings(tmp_path, use_reentrant):
    # TrainingArguments' gradient_checkpointing=True is the deprecated alias of activation_checkpointing=True.
    model = _lora()
    before = _trainable(model)
    embeddings = model.get_input_embeddings().weight
    trainer = _trainer(
        model,
        tmp_path,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    trainer.train()
    assert model.get_base_model().is_activation_checkpointing
    assert not embeddings.requires_grad
    assert all(math.isfinite(loss) for loss in _history(trainer, "loss"))
    # lora_B starts at zero, so lora_A moves only from the second step on: every factor moved, through every layer.
    unchanged = [name for name, value in _trainable(model).items() if torch.equal(value, before[name])]
    assert unchanged == []


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
def test_per_step_losses_match_peft_under_the_same_trainer(tmp_path, label_smoothing_factor):
    settings = dict(
        max_steps=4,
        gradient_accumulation_steps=2,
        label_smoothing_factor=label_smoothing_factor,
    )
    reference = _lora(peft)
    ours = _lora()
    copy_lora_weights(reference, ours)
    reference_trainer = _trainer(reference, tmp_path / "peft", **settings)
    our_trainer = _trainer(ours, tmp_path / "ours", **settings)
    reference_trainer.train()
    our_trainer.train()

    for name in ("loss", "grad_norm"):
        assert _history(our_trainer, name) == pytest.approx(_history(reference_trainer, name), rel=1e-6)
    _assert_same_tensors(_trainable(ours), _trainable(reference))


class _DeclaresMeanLoss(LlamaForCausalLM):
    accepts_loss_kwargs = False  # as Gemma 3n or ESM declare


class _ForwardWithoutKwargs(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None):  # as Qwen2.5-Omni's has no **kwargs
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("base_class", [_DeclaresMeanLoss, _ForwardWithoutKwargs])
def test_trainer_passes_num_items_in_batch_only_if_the_wrapped_model_takes_it(tmp_path, base_class):
    # Otherwise the Trainer neither divides the loss by the accumulation steps nor has it divided by the token count.
    def accepts(library):
        config = library.LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM")
        model = library.get_peft_model(base_class(tiny_llama_config()), config)
        return _trainer(model, tmp_path).model_accepts_loss_kwargs

    assert accepts(lora_engine) is accepts(peft) is False


def test_trainer_sees_the_wrapped_class_name_but_the_printout_keeps_ours():
    # The Trainer's label smoothing reads _get_name(); nn.Module's printout starts with it too.
    model = _lora()
    assert model._get_name() == "LlamaForCausalLM"
    assert repr(model).startswith(
        "PeftModelForCausalLM(\n  (base_model): LoraModel(\n    (model): LlamaForCausalLM("
    )
