"""The Triton ``lora_merge`` (under the interpreter) against the reference: merge, unmerge, fan_in_fan_out, and
the checked merge that refuses NaN/Inf and leaves the weight untouched."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops import lora_merge as merge_op
from lora_engine.reference.lora_merge import lora_merge_ as reference_merge

pytestmark = pytest.mark.usefixtures("kernels")

OUT_FEATURES, IN_FEATURES = 29, 45  # not multiples of any tile


def _factors(rank=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, IN_FEATURES, generator=generator), torch.randn(
        OUT_FEATURES, rank, generator=generator
    )


def _weight(dtype, fan_in_fan_out=False, seed=1):
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return weight.T.contiguous() if fan_in_fan_out else weight


def _merge(module_merge, weight, lora_A, lora_B, scaling, fan_in_fan_out, **flags):
    flags = {"subtract": False, "check_finite": False, **flags}
    module_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out=fan_in_fan_out, **flags)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("check_finite", [False, True], ids=["plain", "checked"])
@pytest.mark.parametrize("rank", [3, 20])
def test_merge_and_unmerge_match_the_reference(kernels, dtype, fan_in_fan_out, check_finite, rank):
    lora_A, lora_B = _factors(rank)
    ours, theirs = _weight(dtype, fan_in_fan_out), _weight(dtype, fan_in_fan_out)
    for subtract in (False, True):
        flags = {"subtract": subtract, "check_finite": check_finite}
        _merge(kernels.lora_merge.lora_merge_, ours, lora_A, lora_B, 0.7, fan_in_fan_out, **flags)
        _merge(reference_merge, theirs, lora_A, lora_B, 0.7, fan_in_fan_out, **flags)
        assert ours.dtype == dtype
        # The same fp32 delta rounded the same way: equal up to the delta's fp32 summation order.
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_merge_writes_through_a_non_contiguous_weight_view(kernels):
    lora_A, lora_B = _factors()
    storage = torch.randn(OUT_FEATURES, 2 * IN_FEATURES)
    original = storage.clone()
    ours, theirs = storage[:, ::2], original.clone()[:, ::2]
    _merge(kernels.lora_merge.lora_merge_, ours, lora_A, lora_B, 1.5, False)
    _merge(reference_merge, theirs, lora_A, lora_B, 1.5, False)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(storage[:, 1::2], original[:, 1::2])  # the columns in between are untouched


def _broken(kind):
    """Factors and a weight whose merged weight would not be finite, for each way that can happen."""
    lora_A, lora_B = _factors()
    weight = _weight(torch.float16)
    if kind == "nan-in-B":
        lora_B[2, 1] = float("nan")
    elif kind == "inf-in-A":
        lora_A[0, 44] = float("inf")
    elif kind == "nan-in-weight":
        weight[28, 0] = float("nan")
    elif kind == "fp16-overflow":  # finite inputs, but the sum leaves fp16's range
        weight[5, 7] = 65504.0
        lora_A, lora_B = lora_A.abs(), lora_B.abs()
    return weight, lora_A, lora_B


# numpy warns inside the interpreter about the very NaN/Inf the kernel must catch
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan-in-B", "inf-in-A", "nan-in-weight", "fp16-overflow"])
def test_checked_merge_refuses_non_finite_and_leaves_the_weight_untouched(kernels, kind):
    weight, lora_A, lora_B = _broken(kind)
    original = weight.clone()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        _merge(kernels.lora_merge.lora_merge_, weight, lora_A, lora_B, 100.0, False, check_finite=True)
    assert torch.equal(weight.nan_to_num(), original.nan_to_num())  # bit for bit, NaN where it was
    with pytest.raises(FloatingPointError, match="NaN or Inf"):  # the reference agrees that it is broken
        _merge(reference_merge, weight.clone(), lora_A, lora_B, 100.0, False, check_finite=True)


def test_merge_bumps_the_weight_version_like_an_in_place_add(kernels):
    lora_A, lora_B = _factors()
    weight = _weight(torch.float32)
    version = weight._version
    _merge(kernels.lora_merge.lora_merge_, weight, lora_A, lora_B, 1.0, False)
    assert weight._version > version


def test_the_op_runs_the_kernel_under_the_triton_backend(kernels, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(merge_op, "lora_merge_", fail)
    lora_A, lora_B = _factors()
    ours, theirs = _weight(torch.float32), _weight(torch.float32)
    merge_op.lora_merge(ours, lora_A, lora_B, 0.5)
    reference_merge(theirs, lora_A, lora_B, 0.5, fan_in_fan_out=False, subtract=False, check_finite=False)
    torch.testing.assert_close(ours, theirs)


def test_mismatched_shapes_are_refused_naming_them(kernels):
    lora_A, lora_B = _factors()
    with pytest.raises(ValueError, match=r"weight \(45, 29\) \(fan_in_fan_out=False\), lora_A \(3, 45\)"):
        merge_op.lora_merge(_weight(torch.float32).T, lora_A, lora_B, 1.0)  # the op checks, then the kernel
