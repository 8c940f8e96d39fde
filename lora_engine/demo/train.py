"""The demo's training run: LoRA (or QLoRA) with the stock ``transformers.Trainer``, measured before and after.

``fine_tune`` takes a function that builds a fresh base model, so the same code runs the real SmolLM2 demo and a
tiny stand-in in the tests. It wraps the base with ``lora_engine.get_peft_model``, trains, saves the adapter,
reloads it into a second fresh base and checks that both give identical logits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_engine.config import LoraConfig
from lora_engine.demo.data import IGNORE_INDEX, PadToLongest, chat_prompt, pad_token_id
from lora_engine.kbit import prepare_model_for_kbit_training
from lora_engine.mapping import get_peft_model
from lora_engine.peft_model import PeftModel

HELD_OUT_EVALUATIONS = 4  # held-out loss points on the curve, besides the one before training


@dataclass
class TrainSettings:
    """What ``fine_tune`` trains: LoRA rank ``rank`` (alpha ``2 * rank``) on every linear layer, ``steps``
    optimizer steps of ``batch_size`` examples at peak learning rate ``lr`` (linear warmup, then cosine decay)."""

    steps: int
    rank: int
    lr: float
    batch_size: int
    seed: int
    four_bit: bool = False
    max_new_tokens: int = 48
    eval_batch_size: int = 16


@dataclass
class DemoResult:
    """What ``fine_tune`` measured and wrote. ``held_out_curve`` holds ``(step, held-out loss)`` from step 0 to
    the last; ``samples`` holds ``(question, answer before, answer after)``."""

    trainable_parameters: int
    all_parameters: int
    held_out_loss_before: float
    held_out_loss_after: float
    held_out_curve: list[tuple[int, float]]
    samples: list[tuple[str, str, str]]
    step_losses: list[float]
    train_seconds: float
    train_tokens: int
    peak_memory_bytes: int
    peak_memory_kind: str
    adapter_dir: Path
    reload_identical: bool
    reload_max_abs_diff: float

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def fine_tune(
    make_base: Callable[[], nn.Module],
    tokenizer,
    train_examples: list[dict[str, list[int]]],
    held_out_examples: list[dict[str, list[int]]],
    sample_questions: list[str],
    settings: TrainSettings,
    device: str,
    output_dir: Path,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train a LoRA adapter on ``train_examples`` (``data.encode_pairs`` output) and check it.

    ``make_base()`` must return a fresh base model on ``device`` each call, with identical weights (it is called
    twice: to train, and to reload the saved adapter into). The adapter is saved to ``output_dir / "adapter"``.
    Held-out loss is the mean cross-entropy over the answer tokens of ``held_out_examples``.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    set_seed(settings.seed)
    base = make_base()
    if settings.four_bit:
        # Checkpointing trades compute for activation memory: worth it on a GPU, only slower on the CPU.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=device.startswith("cuda"))
    lora_config = LoraConfig(
        r=settings.rank, lora_alpha=2 * settings.rank, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA r={settings.rank} on all linear layers: {trainable:,} trainable of {total:,} parameters")

    collate = PadToLongest(pad_token_id(tokenizer))
    held_out_examples = sorted(held_out_examples, key=lambda example: len(example["input_ids"]))
    loss_before = held_out_loss(model, held_out_examples, collate, settings.eval_batch_size)
    answers_before = [greedy_answer(model, tokenizer, q, settings.max_new_tokens) for q in sample_questions]
    log(f"held-out loss before training: {loss_before:.4f}")

    on_gpu = device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        seed=settings.seed,
        data_seed=settings.seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
    )
    monitor = TrainingMonitor(
        lambda: held_out_loss(model, held_out_examples, collate, settings.eval_batch_size),
        every=max(1, settings.steps // HELD_OUT_EVALUATIONS),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_examples, data_collator=collate, callbacks=[monitor]
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss instead of printed dicts
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - monitor.evaluation_seconds
    peak_memory, memory_kind = peak_memory_bytes(device)

    loss_after = held_out_loss(model, held_out_examples, collate, settings.eval_batch_size)
    answers_after = [greedy_answer(model, tokenizer, q, settings.max_new_tokens) for q in sample_questions]
    log(f"held-out loss after training:  {loss_after:.4f}")

    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    identical, max_diff = reload_matches(model, make_base, adapter_dir, collate(held_out_examples[:4]))
    return DemoResult(
        trainable_parameters=trainable,
        all_parameters=total,
        held_out_loss_before=loss_before,
        held_out_loss_after=loss_after,
        held_out_curve=[(0, loss_before), *monitor.held_out, (settings.steps, loss_after)],
        samples=list(zip(sample_questions, answers_before, answers_after)),
        step_losses=monitor.losses,
        train_seconds=train_seconds,
        train_tokens=int(trainer.state.num_input_tokens_seen),
        peak_memory_bytes=peak_memory,
        peak_memory_kind=memory_kind,
        adapter_dir=adapter_dir,
        reload_identical=identical,
        reload_max_abs_diff=max_diff,
    )


@torch.no_grad()
def held_out_loss(model: nn.Module, examples: list[dict], collate: PadToLongest, batch_size: int) -> float:
    """Mean next-token cross-entropy over every labelled token of ``examples`` (not a mean of batch means)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {
            key: value.to(device) for key, value in collate(examples[start : start + batch_size]).items()
        }
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        total_loss += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_loss / total_tokens


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to ``question`` through the chat template, special tokens stripped."""
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False, return_tensors="pt")
    prompt_ids = {key: value.to(device) for key, value in prompt_ids.items()}
    output = model.generate(
        **prompt_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer)
    )
    new_tokens = output[0, prompt_ids["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def reload_matches(
    model: nn.Module, make_base: Callable[[], nn.Module], adapter_dir: Path, batch: dict[str, torch.Tensor]
) -> tuple[bool, float]:
    """Load ``adapter_dir`` into ``make_base()`` and compare its logits on ``batch`` with ``model``'s:
    ``(bitwise identical, max |difference|)``."""
    reloaded = PeftModel.from_pretrained(make_base(), adapter_dir)
    model.eval()
    device = next(model.parameters()).device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
    expected = model(**inputs).logits
    actual = reloaded(**inputs).logits
    return torch.equal(expected, actual), (expected - actual).abs().max().item()


def peak_memory_bytes(device: str) -> tuple[int, str]:
    """``(bytes, what they measure)``: the CUDA allocator's peak since the last reset on a GPU, else the
    process's peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "peak CUDA memory allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "peak RSS"


class TrainingMonitor:
    """A ``TrainerCallback``: one tqdm bar showing the latest training loss, every logged loss kept in
    ``losses`` (log every step for one per step), and ``evaluate()`` run every ``every`` steps before the last,
    its results kept in ``held_out`` as ``(step, loss)`` and its time in ``evaluation_seconds``."""

    def __init__(self, evaluate: Callable[[], float], every: int) -> None:
        self.evaluate = evaluate
        self.every = every
        self.losses: list[float] = []
        self.held_out: list[tuple[int, float]] = []
        self.postfix: dict[str, str] = {}
        self.evaluation_seconds = 0.0
        self.bar = None

    def __getattr__(self, name: str):
        # The Trainer calls every on_* event on every callback; the ones not defined here do nothing.
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            # evaluate() puts the model in eval mode; the Trainer's next training_step puts it back in train.
            start = time.perf_counter()
            self.held_out.append((state.global_step, self.evaluate()))
            self.evaluation_seconds += time.perf_counter() - start
            self.postfix["held-out"] = f"{self.held_out[-1][1]:.3f}"
            self.bar.set_postfix(self.postfix)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.postfix["loss"] = f"{logs['loss']:.3f}"
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
