"""The Triton ``nf4_lora_linear`` (under the interpreter) against the reference (our bit-exact decode, then the dense
reference math): the fused dequantize-in-GEMV path (≤ 64 rows) and the decode-into-a-buffer + dense path (more
rows), forward and the gradients of x, A, B and the bias; NF4/FP4, double quant on/off, blocks across rows and a
partial last block (in = 45: rows do not even start on a byte), fp32/fp16/bf16, dropout, non-contiguous x."""

import bitsandbytes.functional as bnb_F
import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops.nf4_lora_linear import nf4_lora_linear

pytestmark = pytest.mark.usefixtures("kernels")

# As in test_lora_linear_kernel: the kernels round once where the reference rounds the base output, the delta
# and their sum; atol is relative to the largest entry.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
IN_FEATURES, OUT_FEATURES, RANK = 45, 29, 3  # odd: 1305 weights, blocks of 64 cross rows, the last is partial
GEMV_ROWS, DENSE_ROWS = 5, (2, 35)  # ≤ 64 rows: the GEMV; 70 rows: the buffer + dense path


def _weight4(
    weight_dtype=torch.float32, quant_type="nf4", double_quant=True, blocksize=64, in_features=IN_FEATURES
):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT_FEATURES, in_features, generator=generator) * in_features**-0.5
    return bnb_F.quantize_4bit(
        weight.to(weight_dtype), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def _operands(leading, dtype, bias=True, rank=RANK, in_features=IN_FEATURES):
    """x (requires grad), bias (requires grad), lora_A, lora_B (fp32, requiring grad, as peft's adapters)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype).requires_grad_()
    bias_ = torch.randn(OUT_FEATURES, generator=generator).to(dtype).requires_grad_() if bias else None
    lora_A = (torch.randn(rank, in_features, generator=generator) * in_features**-0.5).requires_grad_()
    lora_B = (torch.randn(OUT_FEATURES, rank, generator=generator) * rank**-0.5).requires_grad_()
    return x, bias_, lora_A, lora_B


def _run(backend_name, x, weight4, bias, lora_A, lora_B, dropout_p):
    """Output and the gradients of (x, bias, A, B) of one call on ``backend_name``; the dropout seed is drawn
    from the same generator state on both backends, so both hash the same mask."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_ENGINE_BACKEND", backend_name)
        torch.manual_seed(7)
        out = nf4_lora_linear(x, *weight4, bias, lora_A, lora_B, 1.5, dropout_p)
    leaves = [tensor for tensor in (x, bias, lora_A, lora_B) if tensor is not None]
    grads = torch.autograd.grad(out, leaves, grad_outputs=torch.ones_like(out).normal_(generator=_seeded()))
    return out.detach(), grads


def _seeded():
    return torch.Generator().manual_seed(3)


def _assert_close(got, want, compute_dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    tolerance = TOLERANCE[compute_dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=tolerance * scale, rtol=tolerance)


def _assert_matches_reference(
    leading, dtype, weight4, dropout_p=0.0, bias=True, x_transform=None, in_features=IN_FEATURES
):
    x, bias_, lora_A, lora_B = _operands(leading, dtype, bias, in_features=in_features)
    if x_transform is not None:
        x = x_transform(x)
    out, grads = _run("triton", x, weight4, bias_, lora_A, lora_B, dropout_p)
    want_out, want_grads = _run("reference", x, weight4, bias_, lora_A, lora_B, dropout_p)
    _assert_close(out, want_out, dtype)
    for grad, want in zip(grads, want_grads, strict=True):
        _assert_close(grad, want, dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_matches_the_reference_for_each_format(quant_type, double_quant):
    _assert_matches_reference(
        (GEMV_ROWS,), torch.float32, _weight4(quant_type=quant_type, double_quant=double_quant)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemv_matches_the_reference_in_half_precision(dtype):
    _assert_matches_reference((GEMV_ROWS,), dtype, _weight4(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_row_gemv_matches_the_reference(dtype):
    # One row takes the kernel's dot-free path.
    _assert_matches_reference((1,), dtype, _weight4(dtype, quant_type="fp4"))


def test_gemv_with_dropout_matches_the_reference():
    _assert_matches_reference((GEMV_ROWS,), torch.float32, _weight4(), dropout_p=0.1)


def test_gemv_reads_a_non_contiguous_x_without_bias():
    _assert_matches_reference(
        (3, 2), torch.float32, _weight4(), bias=False, x_transform=lambda x: x.transpose(0, 1)
    )


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_gemv_decodes_other_blocksizes(blocksize):
    # 32: many nested absmax entries per row; 4096: one partial block holds the whole weight.
    _assert_matches_reference((GEMV_ROWS,), torch.float32, _weight4(blocksize=blocksize))


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize(
    ("in_features", "blocksize"),
    [(46, 64), (64, 32), (64, 64)],
    ids=["even-rows-across-blocks", "whole-blocks-of-32", "whole-blocks-of-64"],
)
def test_gemv_on_even_widths_decodes_bytes_in_pairs_and_matches_the_reference(
    in_features, blocksize, double_quant
):
    # An even width starts every row on a byte (the paired decode); with whole blocks per row and the
    # interpreter's 32-wide K tiles inside one block, each block's absmax is decoded once per tile row.
    weight4 = _weight4(blocksize=blocksize, double_quant=double_quant, in_features=in_features)
    _assert_matches_reference((GEMV_ROWS,), torch.float32, weight4, in_features=in_features)


@pytest.mark.parametrize("rows", [1, GEMV_ROWS])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_decodes_bytes_from_the_code_table_exactly_as_from_the_pair_table(quant_type, rows, monkeypatch):
    # The two byte decodes the autotuner chooses between on a GPU (PAIR_TABLE) look up the same fp32 codes, so
    # the GEMV's results are identical, bit for bit, and both match the reference.
    from lora_engine.kernels import nf4_lora_linear as kernel

    weight4 = _weight4(quant_type=quant_type, in_features=64)
    x, bias, lora_A, lora_B = _operands((rows,), torch.float32, in_features=64)
    outputs = {}
    for pair_table in (True, False):
        (config,) = kernel._gemv_kernel.configs  # the interpreter's one config
        variant = kernel._config(config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], 1, 1, pair_table)
        monkeypatch.setattr(kernel._gemv_kernel, "configs", [variant])
        outputs[pair_table], _ = _run("triton", x, weight4, bias, lora_A, lora_B, 0.0)
    assert torch.equal(outputs[True], outputs[False])
    want_out, _ = _run("reference", x, weight4, bias, lora_A, lora_B, 0.0)
    _assert_close(outputs[False], want_out, torch.float32)


@pytest.mark.parametrize("rows", [1, GEMV_ROWS])
def test_gemv_on_an_even_width_in_bf16_matches_the_reference(rows):
    weight4 = _weight4(torch.bfloat16, quant_type="fp4", in_features=64)
    _assert_matches_reference((rows,), torch.bfloat16, weight4, in_features=64)


def test_gemv_rounds_the_weight_to_its_quantized_dtype_before_x_dtype():
    # A weight quantized from bf16 decodes to bf16 values first (bnb's dequantize_4bit), then goes to fp32 x.
    _assert_matches_reference((GEMV_ROWS,), torch.float32, _weight4(torch.bfloat16))


@pytest.mark.parametrize(
    ("dtype", "dropout_p", "quant_type", "double_quant"),
    [
        (torch.float32, 0.0, "fp4", False),
        (torch.float32, 0.1, "nf4", True),
        (torch.float16, 0.0, "nf4", False),
        (torch.bfloat16, 0.1, "nf4", True),
    ],
    ids=["fp32-fp4-single", "fp32-nf4-double-dropout", "fp16-nf4-single", "bf16-nf4-double-dropout"],
)
def test_large_row_path_matches_the_reference(dtype, dropout_p, quant_type, double_quant):
    weight4 = _weight4(dtype, quant_type=quant_type, double_quant=double_quant)
    _assert_matches_reference(DENSE_ROWS, dtype, weight4, dropout_p=dropout_p)


@pytest.mark.parametrize(("leading", "path"), [((GEMV_ROWS,), "_gemv"), (DENSE_ROWS, "decoded_weight")])
def test_row_count_chooses_the_path(kernels, monkeypatch, leading, path):
    calls = []
    original = getattr(kernels.nf4_lora_linear, path)
    monkeypatch.setattr(kernels.nf4_lora_linear, path, lambda *args: calls.append(1) or original(*args))
    x, bias, lora_A, lora_B = _operands(leading, torch.float32)
    with torch.no_grad():
        nf4_lora_linear(x, *_weight4(), bias, lora_A, lora_B, 1.5)
    assert calls == [1]


@pytest.mark.parametrize("leading", [(GEMV_ROWS,), DENSE_ROWS], ids=["gemv", "dense"])
def test_nothing_weight_sized_is_saved_for_backward(leading):
    x, bias, lora_A, lora_B = _operands(leading, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda tensor: saved.append(tensor.shape) or tensor, lambda t: t
    ):
        nf4_lora_linear(x, *_weight4(), bias, lora_A, lora_B, 1.5, 0.1)
    assert saved and torch.Size((OUT_FEATURES, IN_FEATURES)) not in saved
    assert all(shape.numel() <= x.numel() for shape in saved)


def test_large_row_decodes_reuse_one_buffer_per_device_and_dtype(kernels):
    from lora_engine.ops.nf4_dequantize import code_on
    from lora_engine.ops.nf4_lora_linear import Packed4bit

    def packed4(shape):
        packed, state = bnb_F.quantize_4bit(torch.randn(shape), blocksize=64)
        return Packed4bit(packed, state, code_on("nf4", torch.device("cpu")))

    big = kernels.nf4_lora_linear.decoded_weight(packed4((40, 64)), torch.float16)
    small = kernels.nf4_lora_linear.decoded_weight(packed4((16, 48)), torch.float16)
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    assert small.shape == (16, 48) and small.is_contiguous()


# The large-row strategies (LORA_ENGINE_NF4_GEMM): the dequantize-inside-the-GEMM kernel against the reference
# and the buffer path. out = 29 and 70 rows are not multiples of the interpreter's 16 × 16 tile; widths 45 (odd:
# element-wise decode), 46 (even, blocks across rows: an absmax per element), 64 and 128 (whole blocks per row: an
# absmax per tile row); every weight count here ends in a partial 4-bit block except the whole-block ones.
GEMM_CASES = {
    "fp32-nf4-double-b64-odd-width-bias": (torch.float32, "nf4", True, 64, 45, True, 0.0),
    "fp32-fp4-single-b128-odd-width-dropout": (torch.float32, "fp4", False, 128, 45, False, 0.1),
    "bf16-nf4-double-b64-even-width-dropout-bias": (torch.bfloat16, "nf4", True, 64, 46, True, 0.1),
    "bf16-fp4-double-b128-whole-blocks": (torch.bfloat16, "fp4", True, 128, 128, False, 0.0),
    "fp32-nf4-single-b64-whole-blocks-bias": (torch.float32, "nf4", False, 64, 64, True, 0.0),
}


def _forced(monkeypatch, strategy_name, run):
    monkeypatch.setenv("LORA_ENGINE_NF4_GEMM", strategy_name)
    return run()


@pytest.mark.parametrize("case", GEMM_CASES.values(), ids=GEMM_CASES.keys())
def test_dequant_gemm_matches_the_reference_and_the_buffer_path_forward_and_backward(monkeypatch, case):
    dtype, quant_type, double_quant, blocksize, in_features, bias, dropout_p = case
    weight4 = _weight4(dtype, quant_type, double_quant, blocksize, in_features)
    x, bias_, lora_A, lora_B = _operands(DENSE_ROWS, dtype, bias, in_features=in_features)
    out, grads = _forced(
        monkeypatch, "dequant", lambda: _run("triton", x, weight4, bias_, lora_A, lora_B, dropout_p)
    )
    want_out, want_grads = _run("reference", x, weight4, bias_, lora_A, lora_B, dropout_p)
    _assert_close(out, want_out, dtype)
    for grad, want in zip(grads, want_grads, strict=True):
        _assert_close(grad, want, dtype)
    with torch.no_grad():
        buffered = _forced(
            monkeypatch, "fused", lambda: _run_forward(x, weight4, bias_, lora_A, lora_B, dropout_p)
        )
    _assert_close(out, buffered, dtype)


def _run_forward(x, weight4, bias, lora_A, lora_B, dropout_p):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_ENGINE_BACKEND", "triton")
        torch.manual_seed(7)
        return nf4_lora_linear(x, *weight4, bias, lora_A, lora_B, 1.5, dropout_p)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dequant_gemm_rounds_the_weight_to_its_quantized_dtype_before_x_dtype(monkeypatch, weight_dtype):
    # fp32 x: a weight left unrounded would differ from the reference by about 1e-3, far outside fp32 tolerance.
    weight4 = _weight4(weight_dtype, in_features=64)
    x, bias, lora_A, lora_B = _operands(DENSE_ROWS, torch.float32, in_features=64)
    with torch.no_grad():
        got = _forced(monkeypatch, "dequant", lambda: _run_forward(x, weight4, bias, lora_A, lora_B, 0.0))
        want = _run_forward_on("reference", x, weight4, bias, lora_A, lora_B)
    _assert_close(got, want, torch.float32)


def _run_forward_on(backend_name, x, weight4, bias, lora_A, lora_B):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_ENGINE_BACKEND", backend_name)
        return nf4_lora_linear(x, *weight4, bias, lora_A, lora_B, 1.5)


def test_each_large_row_strategy_runs_what_its_name_says(kernels, monkeypatch):
    calls = []
    module = kernels.nf4_lora_linear
    gemm = module.nf4_gemm
    monkeypatch.setattr(module, "nf4_gemm", lambda *args: calls.append("dequant") or gemm(*args))
    decode = module.decoded_weight
    monkeypatch.setattr(module, "decoded_weight", lambda *args: calls.append("decode") or decode(*args))
    x, bias, lora_A, lora_B = _operands(DENSE_ROWS, torch.float32)
    for strategy_name in ("dequant", "fused", "cublas"):
        with torch.no_grad():
            _forced(
                monkeypatch, strategy_name, lambda: _run_forward(x, _weight4(), bias, lora_A, lora_B, 0.0)
            )
    assert calls == ["dequant", "decode", "decode"]


def test_backward_after_a_dequant_forward_decodes_into_the_buffer_and_runs_dx_through_cublas(
    kernels, monkeypatch
):
    dense_backward = kernels.lora_linear.backward
    strategies = []

    def recording_backward(*args):
        strategies.append(args[-1])
        return dense_backward(*args)

    monkeypatch.setattr(kernels.nf4_lora_linear.dense, "backward", recording_backward)
    x, bias, lora_A, lora_B = _operands(DENSE_ROWS, torch.float32)
    for strategy_name in ("dequant", "fused", "cublas"):
        monkeypatch.setenv("LORA_ENGINE_NF4_GEMM", strategy_name)
        out = _run_forward(x, _weight4(), bias, lora_A, lora_B, 0.0)
        out.sum().backward()
    assert strategies == ["cublas", "fused", "cublas"]


def test_an_unknown_4bit_strategy_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_NF4_GEMM", "cutlass")
    x, bias, lora_A, lora_B = _operands(DENSE_ROWS, torch.float32)
    with pytest.raises(
        ValueError,
        match=r"LORA_ENGINE_NF4_GEMM='cutlass' is not a strategy; choose one of auto, dequant, fused",
    ):
        _run_forward(x, _weight4(), bias, lora_A, lora_B, 0.0)


def test_the_dense_setting_does_not_force_the_4bit_choice(kernels, monkeypatch):
    # LORA_ENGINE_LORA_GEMM=dequant would be refused by the dense op; the 4-bit op reads only its own variable.
    from lora_engine.kernels import strategy

    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", "cublas")
    monkeypatch.delenv("LORA_ENGINE_NF4_GEMM", raising=False)
    cpu = torch.device("cpu")
    assert strategy.choose("key", strategy.SMALL_ROWS + 1, cpu, None, strategy.NF4) == "fused"
    monkeypatch.setenv("LORA_ENGINE_NF4_GEMM", " Dequant")
    assert strategy.choose("key", strategy.SMALL_ROWS + 1, cpu, None, strategy.NF4) == "dequant"


def test_the_custom_op_on_the_kernels_passes_opcheck():
    # The fake implementation must describe what the kernels return: xa flattened to [M, r], the packed mask.
    from lora_engine.ops import nf4_lora_linear as op

    packed, quant_state = _weight4()
    x, bias, lora_A, lora_B = _operands((2, 3), torch.float32)  # leading dims the kernels' xa flattens
    scaling = torch.tensor(1.5, dtype=torch.float64)
    forward_args = (
        "triton", x, packed, *op._state_arguments(quant_state), bias, lora_A, lora_B, scaling, 0.1,
        op.draw_seed(x.device),
    )  # fmt: skip
    results = torch.library.opcheck(op._forward_op, forward_args)
    assert all(result == "SUCCESS" for result in results.values()), results
