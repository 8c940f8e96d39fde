"""The Triton ``dora_norm`` (under the interpreter) against the reference: the row norms of ``W + s·B A`` and the
cached ``‖W_o‖²`` on odd shapes, every weight dtype, both layouts, ranks below and above one rank tile, and rows
the update (nearly) cancels, which both backends recompute directly by the same rule."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops import dora_norm as norm_op
from lora_engine.reference import dora_norm as reference

pytestmark = pytest.mark.usefixtures("kernels")

OUT_FEATURES, IN_FEATURES = 37, 45  # not multiples of any tile
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)


def _operands(dtype, fan_in_fan_out=False, rank=3, seed=0):
    """``(weight, lora_A, lora_B)``: the weight in ``dtype`` (``[in, out]`` with ``fan_in_fan_out``), fp32 factors."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    lora_A = torch.randn(rank, IN_FEATURES, generator=generator) / 4
    lora_B = torch.randn(OUT_FEATURES, rank, generator=generator) / 4
    weight = weight.T.contiguous() if fan_in_fan_out else weight
    return weight.to(dtype), lora_A, lora_B


def _both(kernels, weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
    """The kernel's and the reference's norms, each from its own ``‖W_o‖²``."""
    ours = kernels.dora_norm.dora_norm(
        weight, kernels.dora_norm.weight_row_sq_norm(weight, fan_in_fan_out), lora_A, lora_B, scaling,
        fan_in_fan_out, reference.CANCELLATION,
    )  # fmt: skip
    theirs = reference.dora_norm(
        weight, reference.weight_row_sq_norm(weight, fan_in_fan_out), lora_A, lora_B, scaling, fan_in_fan_out
    )
    return ours, theirs


@DTYPES
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_weight_row_sq_norm_matches_the_reference(kernels, dtype, fan_in_fan_out):
    weight, _, _ = _operands(dtype, fan_in_fan_out)
    ours = kernels.dora_norm.weight_row_sq_norm(weight, fan_in_fan_out)
    assert ours.dtype == torch.float32 and ours.shape == (OUT_FEATURES,)
    torch.testing.assert_close(ours, reference.weight_row_sq_norm(weight, fan_in_fan_out), rtol=1e-6, atol=0)


@DTYPES
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rank", [3, 20], ids=["rank-3", "rank-20-two-tiles"])
def test_dora_norm_matches_the_reference(kernels, dtype, fan_in_fan_out, rank):
    weight, lora_A, lora_B = _operands(dtype, fan_in_fan_out, rank)
    ours, theirs = _both(kernels, weight, lora_A, lora_B, 0.7, fan_in_fan_out)
    assert ours.dtype == torch.float32 and ours.shape == (OUT_FEATURES,)
    # Both sum the same three fp32 terms (the weight converted exactly); only the summation order differs.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_dora_norm_reads_strided_factors_and_a_strided_weight(kernels):
    weight, lora_A, lora_B = _operands(torch.float32, rank=5)
    padded = torch.zeros(OUT_FEATURES, 2 * IN_FEATURES)
    padded[:, ::2] = weight
    ours, theirs = _both(kernels, padded[:, ::2], lora_A.T.contiguous().T, lora_B.T.contiguous().T, 1.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _cancelling(dtype, rank=4, seed=3):
    """A weight whose rows 0, 5 and 36 are almost exactly ``-B_o A``: ``‖W_o + B_o A‖ ≪ ‖W_o‖`` there."""
    weight, lora_A, lora_B = _operands(torch.float32, rank=rank, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for row in (0, 5, 36):
        weight[row] = -(lora_B[row] @ lora_A) * (1 - 1e-3) + 1e-5 * torch.randn(
            IN_FEATURES, generator=generator
        )
    return weight.to(dtype), lora_A, lora_B


@DTYPES
def test_rows_the_update_nearly_cancels_are_recomputed_like_the_reference(kernels, dtype):
    weight, lora_A, lora_B = _cancelling(dtype)
    ours, theirs = _both(kernels, weight, lora_A, lora_B, 1.0)
    exact = torch.linalg.norm(weight.double() + lora_B.double() @ lora_A.double(), dim=1)
    assert (exact[[0, 5, 36]] < 0.1 * torch.linalg.norm(weight.double(), dim=1)[[0, 5, 36]]).all()
    # Without the direct recomputation the tiny rows would carry the three-term sum's absolute error,
    # about eps·‖W_o‖² / norm (orders of magnitude over 1e-2 relative here).
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_a_row_the_update_cancels_exactly_has_norm_zero_not_nan(kernels):
    lora_A = torch.tensor([[1.0, 2.0, 3.0]])
    lora_B = torch.tensor([[-1.0], [1.0]])
    weight = torch.cat([lora_A, lora_A])  # row 0 + (-1)·A = 0 exactly
    ours, theirs = _both(kernels, weight, lora_A, lora_B, 1.0)
    assert ours[0].item() == 0.0 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


def test_the_op_runs_the_kernel_under_the_triton_backend(kernels, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(norm_op.reference, "dora_norm", fail)
    monkeypatch.setattr(norm_op.reference, "weight_row_sq_norm", fail)
    weight, lora_A, lora_B = _operands(torch.bfloat16)
    ours = norm_op.dora_norm(weight, norm_op.weight_row_sq_norm(weight), lora_A, lora_B, 0.5)
    direct = torch.linalg.norm(weight.float() + 0.5 * (lora_B @ lora_A), dim=1)
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-6)


def test_the_op_compiles_to_one_graph_around_the_kernel_with_eager_results(kernels):
    weight, lora_A, lora_B = _operands(torch.bfloat16)
    sq_norm = norm_op.weight_row_sq_norm(weight)
    torch._dynamo.reset()
    compiled = torch.compile(norm_op.dora_norm, backend="aot_eager", fullgraph=True)
    try:
        got = compiled(weight, sq_norm, lora_A, lora_B, 0.5)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, norm_op.dora_norm(weight, sq_norm, lora_A, lora_B, 0.5))


def test_the_op_checks_operands_before_the_kernel(kernels):
    weight, lora_A, lora_B = _operands(torch.float32)
    with pytest.raises(ValueError, match=r"lora_B has shape \(36, 3\), expected \(37, 3\)"):
        norm_op.dora_norm(weight, norm_op.weight_row_sq_norm(weight), lora_A, lora_B[:-1], 1.0)
