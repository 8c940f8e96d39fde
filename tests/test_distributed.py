"""2-process CPU (gloo) training: DDP under the stock Trainer and FSDP2 ``fully_shard`` with a manual loop.

Each run is launched with ``torchrun --standalone --nproc_per_node=2 distributed_worker.py`` and must give the
losses of a single-process run on the same global batch, identical LoRA weights on both ranks, files written by
rank 0 only, and an adapter folder that reloads to exactly the trained weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_setup import GLOBAL_BATCH, STEPS, lora_model, token_rows
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import lora_engine

WORKER = Path(__file__).parent / "distributed_worker.py"


def _torchrun(mode: str, output_dir: Path) -> list[dict]:
    """Run the worker on 2 ranks; returns each rank's report, its LoRA weights under ``"weights"``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*command, str(WORKER), mode, str(output_dir)],
        check=True,
        env=environment,
        cwd=WORKER.parent,
        timeout=300,
    )
    reports = []
    for rank in range(2):
        report = json.loads((output_dir / f"rank{rank}.json").read_text())
        report["weights"] = load_file(output_dir / f"rank{rank}.safetensors")
        reports.append(report)
    return reports


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def _assert_same(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


def _reloaded_adapter(folder: Path) -> dict[str, torch.Tensor]:
    base = (
        lora_model().unload()
    )  # the same base weights, without LoRA layers: only the files hold the adapter
    return _trainable(lora_engine.PeftModel.from_pretrained(base, str(folder), is_trainable=True))


class _Rows(Dataset):
    def __init__(self):
        self.rows = token_rows()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _single_process_trainer(output_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = lora_model()
    args = TrainingArguments(
        str(output_dir),
        per_device_train_batch_size=GLOBAL_BATCH,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        report_to=[],
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], _trainable(model)


def _single_process_loop() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows, losses = token_rows(), []
    for step in range(STEPS):
        batch = rows[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        loss = model(**{key: torch.stack([row[key] for row in batch]) for key in batch[0]}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, _trainable(model)


def test_ddp_with_the_stock_trainer_matches_one_process_and_saves_once(tmp_path):
    rank0, rank1 = _torchrun("ddp_trainer", tmp_path)
    expected_losses, expected_weights = _single_process_trainer(tmp_path / "single")

    assert len(rank0["losses"]) == STEPS
    assert rank0["losses"] == pytest.approx(expected_losses, rel=1e-5)
    _assert_same(rank1["weights"], rank0["weights"], rtol=0, atol=0)
    _assert_same(rank0["weights"], expected_weights, rtol=1e-4, atol=1e-6)
    assert rank0["saves"] == [True] and rank1["saves"] == []  # the Trainer asks rank 0 alone to save
    _assert_same(
        _reloaded_adapter(tmp_path / "trainer" / f"checkpoint-{STEPS}"), rank0["weights"], rtol=0, atol=0
    )


def test_fsdp2_fully_shard_loop_matches_one_process_and_saves_once(tmp_path):
    rank0, rank1 = _torchrun("fsdp2_loop", tmp_path)
    expected_losses, expected_weights = _single_process_loop()

    assert len(rank0["losses"]) == STEPS
    assert rank0["losses"] == pytest.approx(expected_losses, rel=1e-5)
    _assert_same(rank1["weights"], rank0["weights"], rtol=0, atol=0)
    _assert_same(rank0["weights"], expected_weights, rtol=1e-4, atol=1e-6)
    # Both ranks call save_pretrained (after the gathering collective); only rank 0 is the main process.
    assert rank0["saves"] == [True] and rank1["saves"] == [False]
    _assert_same(_reloaded_adapter(tmp_path / "adapter"), rank0["weights"], rtol=0, atol=0)
