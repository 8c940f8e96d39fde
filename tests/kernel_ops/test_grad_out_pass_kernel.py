"""The one pass over ``dy`` (``kernels/grad_out_pass.py``, under the interpreter): ``dxa = s · dy B`` and
``dB = s · dyᵀ xa`` against torch in fp64, on odd shapes (rows not a multiple of the row block, odd widths), ranks
1, 5, 16 and 20 (two rank tiles under the interpreter), fp32/fp16/bf16, strided operands; identical bits twice.
The op-level gradients through it (both strategies, dropout, 3-D and non-contiguous x and dy) are in
``test_lora_linear_kernel.py``."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

pytestmark = pytest.mark.usefixtures("kernels")

# Relative to the largest entry of the exact result: rounding of the 16-bit inputs is not the kernel's error.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ROWS, OUT_FEATURES = 53, 45  # 53 rows: three full 16-row blocks and a partial one; 45 columns: three splits


def _operands(dy_dtype, adapter_dtype, rank, rows=ROWS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, OUT_FEATURES, generator=generator).to(dy_dtype)
    lora_B = (torch.randn(OUT_FEATURES, rank, generator=generator) * rank**-0.5).to(adapter_dtype)
    xa = torch.randn(rows, rank, generator=generator).to(adapter_dtype)
    return dy, lora_B, xa


def _assert_matches_fp64(kernels, dy, lora_B, xa, scale):
    dxa, grad_B = kernels.grad_out_pass.grad_out_pass(dy, lora_B, xa, scale)
    want_dxa = scale * dy.double() @ lora_B.double()
    want_B = scale * dy.double().T @ xa.double()
    for got, want in ((dxa, want_dxa), (grad_B, want_B)):
        assert got.dtype == lora_B.dtype and got.shape == want.shape and got.is_contiguous()
        tolerance = TOLERANCE[lora_B.dtype] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=0)


@pytest.mark.parametrize("rank", [1, 5, 16, 20])
@pytest.mark.parametrize(
    ("dy_dtype", "adapter_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=lambda dtype: DTYPE_NAMES[dtype],
)
def test_dxa_and_dB_from_one_pass_equal_the_two_products(kernels, dy_dtype, adapter_dtype, rank):
    _assert_matches_fp64(kernels, *_operands(dy_dtype, adapter_dtype, rank), 0.75)


def test_strided_operands_are_read_through_their_strides(kernels):
    dy, lora_B, xa = _operands(torch.bfloat16, torch.float32, 5)
    dy_columns_major = dy.T.contiguous().T
    wide = torch.zeros(ROWS, 2 * 5)
    wide[:, ::2] = xa
    assert not any(
        tensor.is_contiguous() for tensor in (dy_columns_major, lora_B.T.contiguous().T, wide[:, ::2])
    )
    _assert_matches_fp64(kernels, dy_columns_major, lora_B.T.contiguous().T, wide[:, ::2], 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_the_same_operands_give_the_same_bits_twice(kernels, dtype):
    operands = _operands(dtype, torch.float32, 16, rows=97, seed=3)
    first = kernels.grad_out_pass.grad_out_pass(*operands, 0.5)
    second = kernels.grad_out_pass.grad_out_pass(*operands, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_rows_give_an_empty_dxa_and_a_zero_dB(kernels):
    dxa, grad_B = kernels.grad_out_pass.grad_out_pass(
        *_operands(torch.float32, torch.float32, 5, rows=0), 2.0
    )
    assert dxa.shape == (0, 5) and grad_B.shape == (OUT_FEATURES, 5) and not grad_B.any()
