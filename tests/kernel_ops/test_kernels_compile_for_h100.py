"""The kernels compile for an H100 (sm_90a) here, without a GPU: the code paths the interpreter never takes (tensor
-core dots, TF32 precisions, constexpr branches) are valid Triton, and no tile the autotuners keep spills registers
or overflows shared memory. Nothing runs; performance stays unmeasured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HELPER = Path(__file__).with_name("sm90_compile.py")
NVIDIA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One record per compiled case (see ``sm90_compile.py``), from a fresh process and an empty Triton cache."""
    if not (NVIDIA_TOOLS / "ptxas").exists() or not (NVIDIA_TOOLS / "cuobjdump").exists():
        pytest.skip(f"triton's bundled ptxas/cuobjdump are missing from {NVIDIA_TOOLS}")
    work = tmp_path_factory.mktemp("sm90")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "triton-cache")
    result = subprocess.run(
        [sys.executable, str(HELPER)], env=env, cwd=work, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len({record["case"] for record in records}) == 38, records
    return records


def test_no_kernel_spills_registers_on_h100(compiled):
    spilling = [record for record in compiled if record["stack"] != 0]
    assert not spilling, spilling


def test_every_kernel_fits_h100_shared_memory(compiled):
    too_big = [record for record in compiled if record["shared"] > H100_SHARED_MEMORY_PER_BLOCK]
    assert not too_big, too_big


def test_large_grouped_dots_run_on_hopper_warpgroup_mma(compiled):
    large = [record for record in compiled if record.get("large_dot")]
    assert large and all(record["wgmma"] for record in large), large


def test_nf4_decode_has_no_fused_multiply_add_so_it_rounds_as_bitsandbytes(compiled):
    # The nested absmax is (code2 · absmax2) + offset with two roundings; an FMA would round once.
    decodes = [record for record in compiled if record["case"].startswith("nf4_")]
    assert len(decodes) == 8 and not any(record["fp32_fma"] for record in decodes), decodes


def test_the_cuda_rule_merge_scales_by_the_reciprocal_bnb_cuda_takes(compiled):
    # bnb's kQuantizeBlockwise (nvcc --use_fast_math) scales by MUFU.RCP(absmax), not by a rounded 1 / absmax.
    merges = [record for record in compiled if record["case"].startswith("nf4_merge")]
    by_rule = {record["case"]: record["rcp_approx"] for record in merges}
    assert len(merges) == 6 and all(approx == (" cuda rule" in case) for case, approx in by_rule.items()), (
        by_rule
    )


def test_the_fused_gemm_uses_wgmma_in_every_kept_config(compiled):
    fused = [record for record in compiled if record["case"].startswith("fused")]
    without_wgmma = [record for record in fused if not record["wgmma"]]
    assert fused and not without_wgmma, without_wgmma


def test_the_dy_pass_runs_its_rank_wide_dxa_dot_on_wgmma_in_every_kept_config(compiled):
    # dxa = dy B is [BLOCK_M rows, BLOCK_N] @ [BLOCK_N, 16]: a warpgroup's m64n16 wgmma. The dB dot dyᵀ xa has only
    # BLOCK_N rows: wgmma at 64, the warp-level mma.sync at 32 (below a warpgroup's 64-row minimum).
    passes = [record for record in compiled if record["case"].startswith("grad_out_pass")]
    without = [record for record in passes if not any("m64n16" in op for op in record["mma_instructions"])]
    assert len(passes) >= 3 and not without, without


def test_the_dx_gemm_with_dropout_keeps_the_tiles_of_the_gemm_without(compiled):
    # Both are bf16 GEMMs with fp32 adapters whose rank-r term lands in bf16 (no three-pass dots); the saved mask,
    # read one byte per 8 values, must cost no tile (no spills: test_no_kernel_spills_registers_on_h100).
    def tiles(case):
        return sorted(
            (tuple(sorted(record["config"].items())), record["num_warps"])
            for record in compiled
            if record["case"] == case
        )

    with_dropout = tiles("fused: dx bf16 x, fp32 adapters, dropout")
    assert with_dropout and with_dropout == tiles("fused: forward bf16 x, fp32 adapters, bias")


def test_the_4bit_gemv_dots_on_64_feature_tiles_use_wgmma(compiled):
    # Computed transposed (decoded W tile × xᵀ), a 64-feature tile is a warpgroup MMA's 64-row operand; smaller
    # tiles, and the one-row path, which has no dot, do not use it.
    tiles = [
        record
        for record in compiled
        if record["case"].startswith("gemv_4bit") and "1 row," not in record["case"]
    ]
    wide = [record for record in tiles if record["config"]["BLOCK_N"] == 64]
    assert wide and all(record["wgmma"] for record in wide), tiles


def test_the_4bit_gemm_decodes_without_fused_multiply_add_and_dots_on_wgmma_in_every_kept_tile(compiled):
    # The decoded weights must round as the buffer path's (no FMA in the nested absmax); each tile is ≥ 64 rows,
    # a warpgroup MMA's operand, for bf16 and for fp32 x (TF32) alike.
    gemm = [record for record in compiled if record["case"].startswith("gemm_4bit")]
    assert len({record["case"] for record in gemm}) == 6, gemm
    assert all(record["wgmma"] and not record["fp32_fma"] for record in gemm), gemm


def test_the_4bit_gemm_keeps_its_largest_tiles_for_bf16_layers_of_whole_blocks(compiled):
    # A real layer (width a multiple of the blocksize) in bf16 must not be pruned down to small tiles.
    up = [
        record["config"]
        for record in compiled
        if record["case"] == "gemm_4bit: 4096 → 11008, nf4 double quant, bf16 x, fp32 adapters"
    ]
    assert {(config["BLOCK_M"], config["BLOCK_N"]) for config in up} >= {
        (128, 256),
        (256, 128),
        (128, 128),
    }, up
