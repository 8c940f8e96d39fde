"""One rank of a 2-process CPU (gloo) training run, started by ``torchrun`` from test_distributed.py.

Usage: ``torchrun --nproc_per_node=2 distributed_worker.py {ddp_trainer|fsdp2_loop} OUTPUT_DIR``. Each rank writes
``OUTPUT_DIR/rank<r>.json`` (its logged losses and its ``save_pretrained`` calls) and
``OUTPUT_DIR/rank<r>.safetensors`` (its full LoRA weights after training).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from distributed_setup import GLOBAL_BATCH, STEPS, lora_model, token_rows  # noqa: E402


def _record_saves(model, calls: list) -> None:
    """Note each ``save_pretrained`` call's ``is_main_process`` (the method itself still runs)."""
    save_pretrained = model.save_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs.get("is_main_process", True))
        return save_pretrained(*args, **kwargs)

    model.save_pretrained = recording


def ddp_trainer(output_dir: Path) -> tuple[list[float], list[bool], torch.nn.Module]:
    from transformers import Trainer, TrainingArguments

    model, saves = lora_model(), []
    _record_saves(model, saves)
    args = TrainingArguments(
        str(output_dir / "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // 2,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        train_sampling_strategy="sequential",
        ddp_backend="gloo",
        use_cpu=True,
        disable_tqdm=True,
        report_to=[],
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, saves, model


def fsdp2_loop(output_dir: Path) -> tuple[list[float], list[bool], torch.nn.Module]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model, saves = lora_model(), []
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = token_rows()
    losses = []
    for step in range(STEPS):
        # Rank r takes its half of the step's global batch; every row has as many label tokens.
        batch = [rows[step * GLOBAL_BATCH + index] for index in range(rank, GLOBAL_BATCH, world)]
        inputs = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
        loss = model(**inputs).loss
        loss.backward()  # FSDP2 averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        losses.append(mean_loss.item())
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True)
    )  # a collective: all ranks
    _record_saves(model, saves)
    model.save_pretrained(output_dir / "adapter", state_dict=full, is_main_process=rank == 0)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return losses, saves, {name: full[name] for name in trainable}


def main() -> None:
    mode, output_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    losses, saves, model_or_weights = {"ddp_trainer": ddp_trainer, "fsdp2_loop": fsdp2_loop}[mode](output_dir)
    if isinstance(model_or_weights, dict):
        weights = model_or_weights
    else:
        weights = {name: p.detach() for name, p in model_or_weights.named_parameters() if p.requires_grad}
    save_file(
        {name: value.contiguous() for name, value in weights.items()}, output_dir / f"rank{rank}.safetensors"
    )
    (output_dir / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "saves": saves}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
