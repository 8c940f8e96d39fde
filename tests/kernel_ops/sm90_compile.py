"""Compile the kernels for an H100 (sm_90a) on a machine without a GPU and report what ptxas made of them.

Run as a script in a fresh process (``TRITON_INTERPRET`` unset, so the kernels are decorated for compilation);
prints one JSON line per compiled (case, config): its name, registers, stack bytes (non-zero = register spills),
shared memory, whether the PTX has wgmma. Each case is compiled with the specialization a real launch gets (integer
arguments equal to 1 become constants, multiples of 16 are marked divisible by 16 unless the kernel does not
specialize them, pointers 16-byte aligned), for every tile its autotuner keeps after pruning, at realistic sizes
(8192 tokens, 4096 × 4096, rank 16).

Longer than the house's ~450 lines because it is one table: a generator of cases per kernel, all in one place so
that ``test_kernels_compile_for_h100.py`` reads every case's record from one run (one fresh process compiles them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from lora_engine.kernels import (
    dora_norm,
    fused_linear,
    grad_out_pass,
    grouped_lora,
    lora_merge,
    low_rank,
    nf4_dequantize,
    nf4_gemm,
    nf4_lora_linear,
    nf4_merge,
)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TOKENS, IN_FEATURES, OUT_FEATURES, RANK = 8192, 4096, 4096, 16
TRITON_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8",
}  # fmt: skip


def _compile(jit_function, args: dict, constexprs: dict, num_warps: int, num_stages: int, **options) -> dict:
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(jit_function.arg_names):
        value = args.get(name)
        if name in constants:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif jit_function.params[index].do_not_specialize:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(jit_function, signature, constants, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **options}
    compiled = triton.compile(source, target=H100, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "shared": compiled.metadata.shared,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        # Which tensor-core instructions the dots became (Hopper's wgmma, or the older warp-level mma.sync).
        "mma_instructions": sorted(
            set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", compiled.asm["ptx"]))
        ),
        "fp32_fma": "fma.rn.f32" in compiled.asm["ptx"],
        # The approximate reciprocal bnb's CUDA build uses for 1 / absmax (nvcc --use_fast_math: MUFU.RCP).
        "rcp_approx": "rcp.approx.ftz.f32" in compiled.asm["ptx"],
    }


def _autotuned(name: str, autotuner, args: dict, constexprs: dict):
    """One record per config the autotuner keeps for this call after pruning."""
    configs = autotuner.configs
    if autotuner.early_config_prune:
        configs = autotuner.early_config_prune(configs, args, **constexprs)
    for config in configs:
        result = _compile(
            autotuner.fn, args, {**constexprs, **config.kwargs}, config.num_warps, config.num_stages
        )
        yield {"case": name, "config": config.kwargs, "num_warps": config.num_warps, **result}


def _tensor(dtype):
    return torch.empty(1, dtype=dtype)


def _fused_cases():
    bf16, fp32 = torch.bfloat16, torch.float32
    # (name, x dtype, adapter dtype, has_base, has_bias, dropout, n, k, weight strides, lora_B strides)
    cases = [
        (
            "forward bf16 x, fp32 adapters, bias",
            bf16,
            fp32,
            True,
            True,
            False,
            OUT_FEATURES,
            IN_FEATURES,
            (1, IN_FEATURES),
            (1, RANK),
        ),
        (
            "forward bf16 x, bf16 adapters",
            bf16,
            bf16,
            True,
            False,
            False,
            OUT_FEATURES,
            IN_FEATURES,
            (1, IN_FEATURES),
            (1, RANK),
        ),
        (
            "forward fp32",
            fp32,
            fp32,
            True,
            True,
            False,
            OUT_FEATURES,
            IN_FEATURES,
            (1, IN_FEATURES),
            (1, RANK),
        ),
        (
            "dx bf16 x, fp32 adapters, dropout",
            bf16,
            fp32,
            True,
            False,
            True,
            IN_FEATURES,
            OUT_FEATURES,
            (IN_FEATURES, 1),
            (IN_FEATURES, 1),
        ),
        (
            "low-rank term only, fp32, dropout",
            bf16,
            fp32,
            False,
            False,
            True,
            OUT_FEATURES,
            0,
            (16, 16),
            (1, RANK),
        ),
        # The cublas strategy's epilogues: y += s·xa Bᵀ after torch's GEMM; dx += mask ⊙ (dxa A)/(1-p).
        (
            "cublas epilogue: y += s xa Bᵀ, bf16 y",
            bf16,
            fp32,
            False,
            False,
            False,
            OUT_FEATURES,
            0,
            (16, 16),
            (1, RANK),
        ),
        (
            "cublas epilogue: dx += mask (dxa A)",
            bf16,
            fp32,
            False,
            False,
            True,
            IN_FEATURES,
            0,
            (16, 16),
            (IN_FEATURES, 1),
        ),
    ]
    for (
        name,
        x_dtype,
        adapter_dtype,
        has_base,
        has_bias,
        dropout,
        n,
        k,
        weight_strides,
        lora_B_strides,
    ) in cases:
        accumulate = name.startswith("cublas")
        out_dtype = x_dtype if has_base or accumulate else adapter_dtype
        args = {
            "x_ptr": _tensor(x_dtype), "weight_ptr": _tensor(x_dtype), "bias_ptr": _tensor(x_dtype),
            "xa_ptr": _tensor(adapter_dtype), "lora_B_ptr": _tensor(adapter_dtype), "out_ptr": _tensor(out_dtype),
            "M": TOKENS, "N": n, "K": k, "R": RANK, "stride_x_m": k or 16, "stride_x_k": 1,
            "stride_weight_k": weight_strides[0], "stride_weight_n": weight_strides[1], "stride_bias": 1, "stride_xa_m": RANK,
            "stride_xa_r": 1, "stride_lora_B_r": lora_B_strides[0], "stride_lora_B_n": lora_B_strides[1],
            "stride_out_m": n, "stride_out_n": 1, "bits_ptr": _tensor(torch.uint8), "stride_bits_m": n // 8,
            "scale": 0.5, "ROW_CLASS": 2,
        }  # fmt: skip
        constexprs = {
            "HAS_BASE": has_base, "HAS_BIAS": has_bias, "HAS_DROPOUT": dropout, "ACCUMULATE": accumulate,
            "FP32_PRECISION": "tf32x3",
            "LOW_RANK_PRECISION": "tf32x3" if out_dtype == fp32 else "tf32", "BLOCK_R": RANK,
        }  # fmt: skip
        yield from _autotuned(f"fused: {name}", fused_linear._fused_linear_kernel, args, constexprs)


def _rank_cases():
    bf16, fp32 = torch.bfloat16, torch.float32
    for name, k, dropout, lora_A_strides in [
        ("xa = drop(x) Aᵀ", IN_FEATURES, True, (1, IN_FEATURES)),
        ("dxa = s dy B", OUT_FEATURES, False, (RANK, 1)),
    ]:
        args = {
            "x_ptr": _tensor(bf16), "lora_A_ptr": _tensor(fp32), "out_ptr": _tensor(fp32), "M": TOKENS, "K": k,
            "R": RANK, "stride_x_m": k, "stride_x_k": 1, "stride_lora_A_k": lora_A_strides[0],
            "stride_lora_A_r": lora_A_strides[1], "stride_out_m": RANK, "stride_out_r": 1, "scale": 1.1,
            "seed_ptr": _tensor(torch.int64), "bits_ptr": _tensor(torch.uint8), "stride_bits_m": k // 8,
            "threshold": round(0.1 * 2**24), "ROW_CLASS": 2,
        }  # fmt: skip
        constexprs = {"HAS_DROPOUT": dropout, "FP32_PRECISION": "tf32x3", "BLOCK_R": RANK}
        yield from _autotuned(f"project: {name}", low_rank._project_kernel, args, constexprs)
    for name, k, dropout, partial_strides in [
        ("dA", IN_FEATURES, True, (IN_FEATURES * RANK, 1, IN_FEATURES))
    ]:
        args = {
            "x_ptr": _tensor(bf16), "dxa_ptr": _tensor(fp32), "partial_ptr": _tensor(fp32), "M": TOKENS, "K": k,
            "R": RANK, "rows_per_split": 256, "stride_x_m": k, "stride_x_k": 1, "stride_dxa_m": RANK,
            "stride_dxa_r": 1, "stride_partial_split": partial_strides[0], "stride_partial_k": partial_strides[1],
            "stride_partial_r": partial_strides[2], "scale": 1.1, "bits_ptr": _tensor(torch.uint8),
            "stride_bits_m": k // 8, "ROW_CLASS": 2,
        }  # fmt: skip
        constexprs = {"HAS_DROPOUT": dropout, "FP32_PRECISION": "tf32x3", "BLOCK_R": RANK}
        yield from _autotuned(f"outer: {name}", low_rank._outer_kernel, args, constexprs)


def _grad_out_cases():
    """dxa and the dB partials from one read of dy: bf16 dy with fp32 adapters (two TF32 passes) and bf16 ones; fp32
    dy and adapters (three TF32 passes)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    for dy_dtype, adapter_dtype in ((bf16, fp32), (bf16, bf16), (fp32, fp32)):
        args = {
            "dy_ptr": _tensor(dy_dtype), "lora_B_ptr": _tensor(adapter_dtype), "xa_ptr": _tensor(adapter_dtype),
            "dxa_partial_ptr": _tensor(torch.float32), "dB_partial_ptr": _tensor(torch.float32), "M": TOKENS,
            "N": OUT_FEATURES, "R": RANK, "cols_per_split": OUT_FEATURES // 2, "stride_dy_m": OUT_FEATURES,
            "stride_dy_n": 1, "stride_lora_B_n": RANK, "stride_lora_B_r": 1, "stride_xa_m": RANK, "stride_xa_r": 1,
            "stride_dxa_split": TOKENS * RANK, "stride_dxa_m": RANK, "stride_dB_block": OUT_FEATURES * RANK,
            "stride_dB_n": RANK, "scale": 2.0, "ROW_CLASS": 2,
        }  # fmt: skip
        rows_per_block = grad_out_pass.rows_per_block(dy_dtype, adapter_dtype)
        constexprs = {"FP32_PRECISION": "tf32x3", "BLOCK_R": RANK, "BLOCK_M": rows_per_block}
        name = f"grad_out_pass: dxa + dB, {TRITON_TYPES[dy_dtype]} dy, {TRITON_TYPES[adapter_dtype]} adapters"
        for record in _autotuned(name, grad_out_pass._grad_out_pass_kernel, args, constexprs):
            yield {**record, "config": {**record["config"], "BLOCK_M": rows_per_block}}


def _merge_cases():
    for write in (False, True):
        args = {
            "weight_ptr": _tensor(torch.bfloat16), "lora_A_ptr": _tensor(torch.float32),
            "lora_B_ptr": _tensor(torch.float32), "flag_ptr": _tensor(torch.int32), "OUT": OUT_FEATURES,
            "IN": IN_FEATURES, "R": RANK, "stride_w_out": IN_FEATURES, "stride_w_in": 1, "stride_a_r": IN_FEATURES,
            "stride_a_in": 1, "stride_b_out": RANK, "stride_b_r": 1, "scale": 2.0,
        }  # fmt: skip
        constexprs = {
            "WRITE": write, "FP32_PRECISION": "tf32x3", "BLOCK_R": RANK, "BLOCK_OUT": lora_merge.BLOCK_OUT,
            "BLOCK_IN": lora_merge.BLOCK_IN,
        }  # fmt: skip
        result = _compile(lora_merge._merge_kernel, args, constexprs, lora_merge.NUM_WARPS, 3)
        yield {"case": f"merge: {'write' if write else 'check'} pass, bf16 weight", **result}


def _nf4_cases():
    for nested in (False, True):
        args = {
            "packed_ptr": _tensor(torch.uint8), "code_ptr": _tensor(torch.float32),
            "absmax_ptr": _tensor(torch.uint8 if nested else torch.float32), "absmax2_ptr": _tensor(torch.float32),
            "code2_ptr": _tensor(torch.float32), "out_ptr": _tensor(torch.bfloat16),
            "NUMEL": OUT_FEATURES * IN_FEATURES, "offset": 0.01,
        }  # fmt: skip
        constexprs = {
            "BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": nested, "ABSMAX2_DTYPE": triton.language.float32,
            "BLOCK": nf4_dequantize.BLOCK, "WEIGHT_DTYPE": triton.language.bfloat16,
        }  # fmt: skip
        result = _compile(
            nf4_dequantize._dequantize_kernel, args, constexprs, nf4_dequantize.NUM_WARPS, 3,
            enable_fp_fusion=False,
        )  # fmt: skip
        yield {"case": f"nf4_dequantize: {'double' if nested else 'single'} quant, bf16 out", **result}
    merge_args = {
        **args, "delta_ptr": _tensor(torch.float32), "bounds_ptr": _tensor(torch.float32),
        "order_ptr": _tensor(torch.int32), "new_packed_ptr": _tensor(torch.uint8),
        "new_absmax_ptr": _tensor(torch.float32), "flag_ptr": _tensor(torch.int32),
    }  # fmt: skip
    # bnb's pure-PyTorch rounding rule (the CPU's), then its CUDA rule for NF4 and FP4 (FP4 adds the sign bit).
    for rule, quant_type in (("torch", "nf4"), ("cuda", "nf4"), ("cuda", "fp4")):
        for blocksize in (64, 4096):
            merge_constexprs = {
                **constexprs, "BLOCKSIZE": blocksize, "SIGN": 1.0, "WEIGHT_DTYPE": triton.language.bfloat16,
                "CUDA_RULE": rule == "cuda", "SIGN_BIT": rule == "cuda" and quant_type == "fp4",
            }  # fmt: skip
            del merge_constexprs["BLOCK"]
            result = _compile(
                nf4_merge._merge_kernel, merge_args, merge_constexprs, nf4_merge.num_warps(blocksize), 3,
                enable_fp_fusion=False,
            )  # fmt: skip
            name = f"nf4_merge: {rule} rule, {quant_type}, double quant, blocksize {blocksize}, bf16 weight"
            yield {"case": name, **result}


def _gemv_4bit_cases():
    """The 4-bit GEMV at a Llama MLP projection (11008 × 4096, NF4, double quant, bf16 x, fp32 adapters of rank 16),
    for one row (no dot), 16 rows and 64 rows (tensor-core dots), every config its autotuner keeps."""
    out_features, in_features = 11008, 4096
    args = {
        "x_ptr": _tensor(torch.bfloat16), "packed_ptr": _tensor(torch.uint8), "code_ptr": _tensor(torch.float32),
        "pair_table_ptr": _tensor(torch.int64), "absmax_ptr": _tensor(torch.uint8), "absmax2_ptr": _tensor(torch.float32),
        "code2_ptr": _tensor(torch.float32), "bias_ptr": _tensor(torch.bfloat16), "xa_ptr": _tensor(torch.float32),
        "lora_B_ptr": _tensor(torch.float32), "out_ptr": _tensor(torch.bfloat16), "N": out_features,
        "K": in_features, "R": RANK, "stride_x_m": in_features, "stride_x_k": 1, "stride_bias": 1,
        "stride_xa_m": RANK, "stride_xa_r": 1, "stride_lora_B_n": RANK, "stride_lora_B_r": 1,
        "stride_out_m": out_features, "stride_out_n": 1, "offset": 0.01, "scale": 2.0,
    }  # fmt: skip
    for rows in (1, 16, 64):
        constexprs = {
            "WEIGHT_DTYPE": triton.language.bfloat16, "BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": True,
            "ABSMAX2_DTYPE": triton.language.float32, "HAS_BIAS": True, "FP32_PRECISION": "tf32x3",
            "LOW_RANK_PRECISION": "tf32", "BLOCK_M": rows, "BLOCK_R": RANK, "WIDE_INDEX": False,
            "EVEN_K": True, "WHOLE_BLOCK_ROWS": True,
        }  # fmt: skip
        yield from _autotuned(
            f"gemv_4bit: {rows} row{'s' if rows > 1 else ''}, nf4 double quant, bf16 x, fp32 adapters",
            nf4_lora_linear._gemv_kernel,
            {**args, "M": rows},
            constexprs,
        )


def _gemm_4bit_cases():
    """The dequantize-in-GEMM at 8192 rows, NF4 with double quant, blocksize 64, bias, rank 16: a Llama MLP's up
    (4096 → 11008) and down (11008 → 4096) projections in bf16 (wgmma), with fp32 or bf16 adapters; fp32 x
    (three-pass TF32); and widths that are not whole blocks (4100: each weight's absmax decoded on its own). Every
    config its autotuner keeps, compiled without FMA contraction, as launched."""
    bf16, fp32 = torch.bfloat16, torch.float32
    for in_features, out_features, x_dtype, adapter_dtype in (
        (4096, 11008, bf16, fp32), (11008, 4096, bf16, fp32), (4096, 11008, bf16, bf16), (4096, 11008, fp32, fp32),
        (4100, 11008, bf16, fp32), (4100, 11008, fp32, fp32),
    ):  # fmt: skip
        args = {
            "x_ptr": _tensor(x_dtype), "packed_ptr": _tensor(torch.uint8), "code_ptr": _tensor(fp32),
            "pair_table_ptr": _tensor(torch.int64), "absmax_ptr": _tensor(torch.uint8), "absmax2_ptr": _tensor(fp32),
            "code2_ptr": _tensor(fp32), "bias_ptr": _tensor(x_dtype), "xa_ptr": _tensor(adapter_dtype),
            "lora_B_ptr": _tensor(adapter_dtype), "out_ptr": _tensor(x_dtype), "M": TOKENS, "N": out_features,
            "K": in_features, "R": RANK, "stride_x_m": in_features, "stride_x_k": 1, "stride_bias": 1,
            "stride_xa_m": RANK, "stride_xa_r": 1, "stride_lora_B_n": RANK, "stride_lora_B_r": 1,
            "stride_out_m": out_features, "stride_out_n": 1, "offset": 0.01, "scale": 2.0, "ROW_CLASS": 2,
        }  # fmt: skip
        constexprs = {
            "WEIGHT_DTYPE": triton.language.bfloat16, "BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": True,
            "ABSMAX2_DTYPE": triton.language.float32, "HAS_BIAS": True, "WIDE_INDEX": False, "EVEN_K": True,
            "WHOLE_BLOCK_ROWS": in_features % 64 == 0, "FP32_PRECISION": "tf32x3",
            "LOW_RANK_PRECISION": "tf32x3" if x_dtype == fp32 else "tf32", "BLOCK_R": RANK,
        }  # fmt: skip
        autotuner = nf4_gemm._nf4_gemm_kernel
        name = (
            f"gemm_4bit: {in_features} → {out_features}, nf4 double quant, {TRITON_TYPES[x_dtype]} x, "
            f"{TRITON_TYPES[adapter_dtype]} adapters"
        )
        for config in autotuner.early_config_prune(autotuner.configs, args, **constexprs):
            result = _compile(
                autotuner.fn, args, {**constexprs, **config.kwargs}, config.num_warps, config.num_stages,
                enable_fp_fusion=False,
            )  # fmt: skip
            yield {"case": name, "config": config.kwargs, "num_warps": config.num_warps, **result}


def _grouped_cases():
    """A prefill-sized mixed batch (bf16 x, bf16 adapters): its dots are large enough for wgmma."""
    tiles = {
        name: _tensor(torch.int32)
        for name in ("order_ptr", "tile_adapter_ptr", "tile_start_ptr", "tile_end_ptr")
    }
    bf16 = torch.bfloat16
    shrink_args = {
        "x_ptr": _tensor(bf16), "lora_A_ptr": _tensor(bf16), "h_ptr": _tensor(torch.float32), **tiles,
        "K": IN_FEATURES, "R": RANK, "stride_x_t": IN_FEATURES, "stride_x_k": 1, "stride_a_n": RANK * IN_FEATURES,
        "stride_a_r": IN_FEATURES, "stride_a_k": 1,
    }  # fmt: skip
    blocks = {"FP32_PRECISION": "tf32x3", "BLOCK_M": grouped_lora.BLOCK_M, "BLOCK_R": RANK}
    result = _compile(
        grouped_lora._shrink_kernel, shrink_args, {**blocks, "BLOCK_K": grouped_lora.BLOCK_K},
        grouped_lora.NUM_WARPS, 3,
    )  # fmt: skip
    yield {"case": "grouped_lora: shrink, bf16", "large_dot": True, **result}
    expand_args = {
        "h_ptr": _tensor(torch.float32), "lora_B_ptr": _tensor(bf16), "scaling_ptr": _tensor(torch.float32),
        "out_ptr": _tensor(bf16), **tiles, "N": OUT_FEATURES, "R": RANK, "stride_b_n_adapter": OUT_FEATURES * RANK,
        "stride_b_n": RANK, "stride_b_r": 1, "stride_out_t": OUT_FEATURES, "stride_out_n": 1,
    }  # fmt: skip
    result = _compile(
        grouped_lora._expand_kernel, expand_args, {**blocks, "BLOCK_N": grouped_lora.BLOCK_N},
        grouped_lora.NUM_WARPS, 3,
    )  # fmt: skip
    yield {"case": "grouped_lora: expand, bf16", "large_dot": True, **result}


def _dora_cases():
    """DoRA's row norms at rank 16 and at the largest rank tile (64), and the ``‖W_o‖²`` cache."""
    tiles = {"BLOCK_OUT": dora_norm.BLOCK_OUT, "BLOCK_IN": dora_norm.BLOCK_IN}
    for name, weight_dtype, weight_strides, rank in [
        ("bf16 weight, rank 16", torch.bfloat16, (IN_FEATURES, 1), RANK),
        ("bf16 weight, rank 64", torch.bfloat16, (IN_FEATURES, 1), 64),
        ("fp32 weight stored [in, out] (Conv1D), rank 16", torch.float32, (1, OUT_FEATURES), RANK),
    ]:
        args = {
            "weight_ptr": _tensor(weight_dtype), "sq_norm_ptr": _tensor(torch.float32),
            "lora_A_ptr": _tensor(torch.float32), "lora_B_ptr": _tensor(torch.float32),
            "gram_ptr": _tensor(torch.float32), "norm_ptr": _tensor(torch.float32), "OUT": OUT_FEATURES,
            "IN": IN_FEATURES, "R": rank, "stride_w_out": weight_strides[0], "stride_w_in": weight_strides[1],
            "stride_a_r": IN_FEATURES, "stride_a_in": 1, "stride_b_out": rank, "stride_b_r": 1, "scale": 2.0,
            "cancellation": 0.01,
        }  # fmt: skip
        constexprs = {"FP32_PRECISION": "tf32x3", "BLOCK_R": rank, **tiles}
        result = _compile(dora_norm._row_norm_kernel, args, constexprs, dora_norm.NUM_WARPS, 3)
        yield {"case": f"dora_norm: row norms, {name}", **result}
    args = {
        "weight_ptr": _tensor(torch.bfloat16), "out_ptr": _tensor(torch.float32), "OUT": OUT_FEATURES,
        "IN": IN_FEATURES, "stride_w_out": IN_FEATURES, "stride_w_in": 1,
    }  # fmt: skip
    result = _compile(dora_norm._row_sq_norm_kernel, args, tiles, dora_norm.NUM_WARPS, 3)
    yield {"case": "dora_norm: ‖W_o‖², bf16 weight", **result}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    for result in (
        *_fused_cases(),
        *_rank_cases(),
        *_grad_out_cases(),
        *_merge_cases(),
        *_nf4_cases(),
        *_gemv_4bit_cases(),
        *_gemm_4bit_cases(),
        *_grouped_cases(),
        *_dora_cases(),
    ):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
