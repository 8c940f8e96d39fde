"""Quickstart: LoRA on a small Llama built from a config, offline, on the CPU in seconds.

Wraps the model with ``lora_engine`` exactly as one would with peft, trains a few steps on a toy
next-token task (counting modulo the vocabulary), saves the adapter in peft's format, reloads it into a
fresh copy of the base model and checks that the logits are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_engine import LoraConfig, PeftModel, get_peft_model


def build_base(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def counting_batch(batch_size: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``s, s+1, s+2, ...`` modulo the vocabulary: easy for a model to learn, impossible to guess."""
    starts = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
    return (starts + torch.arange(length)) % vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir", default=None, help="where to save the adapter (default: a temp folder)"
    )
    args = parser.parse_args()

    model = get_peft_model(
        build_base(args.seed),
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    held_out = counting_batch(16, 32, model.config.vocab_size, torch.Generator().manual_seed(args.seed + 1))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    loss_before = held_out_loss()
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = counting_batch(16, 32, model.config.vocab_size, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    train_seconds = time.perf_counter() - start
    loss_after = held_out_loss()
    print(
        f"held-out loss: {loss_before:.4f} before, {loss_after:.4f} after ({train_seconds:.1f} s of training)"
    )

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="lora_engine_quickstart_")
    model.save_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(build_base(args.seed), output_dir)
    with torch.no_grad():
        identical = torch.equal(model(input_ids=held_out).logits, reloaded(input_ids=held_out).logits)
    print(f"adapter saved to {output_dir}; reloaded into a fresh base: logits identical = {identical}")
    if not identical or loss_after >= loss_before:
        raise SystemExit("quickstart failed: the reloaded adapter differs or training did not lower the loss")


if __name__ == "__main__":
    main()
