"""The roofline model beside each CUDA case: the peaks per GPU, and the least work of the workloads checked
against hand counts at the issues' reference shapes."""

import pytest
import torch

from lora_engine.bench import roofline, suite


def test_peaks_are_chosen_by_the_gpu_name():
    assert roofline.peaks_for("NVIDIA H200").bandwidth == 4.3e12
    assert roofline.peaks_for("NVIDIA H100 80GB HBM3").bandwidth == 3.35e12
    assert roofline.peaks_for("NVIDIA H200").flops == roofline.peaks_for("NVIDIA H100 PCIe").flops == 790e12


def test_another_gpu_gets_the_h100_figures_and_says_they_are_assumed():
    peaks = roofline.peaks_for("NVIDIA A100-SXM4-80GB")
    assert peaks.bandwidth == 3.35e12
    assert "assumed H100 figures, NVIDIA A100-SXM4-80GB is not in the table" in peaks.describe()


def test_lora_layer_forward_backward_at_the_reference_shape_is_compute_bound():
    # 8192 tokens, 4096 -> 4096, r 16, bf16: base forward + input gradient 4·T·K·M, LoRA 6·T·r·(K+M).
    work = roofline.linear_work(8192, 4096, 4096, 16, 2, training=True)
    t, k, m, r = 8192, 4096, 4096, 16
    assert work.flops == 4 * t * k * m + 6 * t * r * (k + m)
    assert work.bytes == 2 * (3 * t * k + 2 * t * m) + 2 * 2 * k * m
    h200 = roofline.peaks_for("NVIDIA H200")
    assert work.seconds(h200) == work.flops / 790e12 == pytest.approx(7.04e-4, rel=0.01)


def test_nf4_decode_at_batch_1_streams_the_4bit_weight_once():
    # Issue 13's goal: 4096 x 11008 at batch 1 in <= 10 us on an H200; the roofline is the weight read alone.
    work = roofline.linear_work(1, 4096, 11008, 16, 2, training=False, base="nf4")
    h200 = roofline.peaks_for("NVIDIA H200")
    assert work.seconds(h200) == work.bytes / 4.3e12
    assert 4096 * 11008 * 0.5 / 4.3e12 < work.seconds(h200) < 6e-6


def test_dropout_adds_a_bit_packed_mask_written_once_and_read_twice():
    without = roofline.linear_work(100, 64, 32, 4, 2, training=True)
    with_dropout = roofline.linear_work(100, 64, 32, 4, 2, training=True, dropout=0.1)
    assert with_dropout.bytes - without.bytes == 3 * 100 * 64 / 8


def test_every_cuda_case_but_the_adapter_registry_has_a_roofline():
    cases = suite.cases("cuda", "quick")
    without = {case.workload for case in cases if roofline.work_of(case) is None}
    assert without == {"adapters", "adapter_memory"}


def test_a_training_step_counts_in_the_autocast_precision():
    case = next(case for case in suite.cases("cuda", "quick", ("train_step",)) if case.params["seq"] == 2048)
    assert case.params["dtype"] == case.params["autocast"] == torch.bfloat16
    spec = case.params["spec"]
    h, i, kv = spec.hidden, spec.intermediate, spec.hidden * spec.kv_heads // spec.heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    weights = spec.layers * per_layer + h * spec.vocab
    # Every frozen weight is read twice (forward, input gradient) in bf16 at the least.
    assert roofline.work_of(case).bytes > 2 * 2 * weights
