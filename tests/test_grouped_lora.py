"""The ``grouped_lora`` op (mixed-adapter batches) against a plain per-row loop.

Contract under test: ``delta[b] = s_i · (x[b] A_iᵀ) B_iᵀ`` with ``i = row_adapter[b]``, and ``delta[b] = 0`` where
``row_adapter[b] = -1``; ``A [n, r, in]`` and ``B [n, out, r]`` stack the adapters, smaller ranks zero-padded.
"""

import pytest
import torch

from lora_engine import backend
from lora_engine.ops.grouped_lora import grouped_lora

IN_FEATURES, OUT_FEATURES = 37, 53  # odd on purpose: no size is a multiple of a tile
RANKS = (5, 2, 3)  # adapter 0 has the largest rank; 1 and 2 are zero-padded to it
ROW_ADAPTER = (2, -1, 0, 0, 1, -1, 2)  # every adapter, and base-only rows, in no particular order


def stacked_adapters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(A [n, r_max, in], B [n, out, r_max], scaling [n])``, the rows/columns past each rank zero."""
    generator = torch.Generator().manual_seed(seed)
    rank = max(RANKS)
    lora_A = torch.zeros(len(RANKS), rank, IN_FEATURES)
    lora_B = torch.zeros(len(RANKS), OUT_FEATURES, rank)
    for index, r in enumerate(RANKS):
        lora_A[index, :r] = torch.randn(r, IN_FEATURES, generator=generator)
        lora_B[index, :, :r] = torch.randn(OUT_FEATURES, r, generator=generator)
    scaling = torch.tensor([0.5, 2.0, -1.25])
    return lora_A, lora_B, scaling


def row_adapter_tensor() -> torch.Tensor:
    return torch.tensor(ROW_ADAPTER, dtype=torch.long)


def inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def per_row_loop(x, row_adapter, lora_A, lora_B, scaling, ranks=None):
    """The contract written as a loop over rows, in fp32; ``ranks`` slices each adapter to its own rank."""
    rows = []
    for row, adapter in zip(x, row_adapter.tolist()):
        if adapter < 0:
            rows.append(torch.zeros(*row.shape[:-1], lora_B.shape[1]))
            continue
        r = lora_A.shape[1] if ranks is None else ranks[adapter]
        hidden = row.float() @ lora_A[adapter, :r].T
        rows.append(scaling[adapter] * (hidden @ lora_B[adapter, :, :r].T))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "shape", [(len(ROW_ADAPTER), IN_FEATURES), (len(ROW_ADAPTER), 3, IN_FEATURES)], ids=["2d", "3d"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
def test_grouped_lora_equals_per_row_loop(shape, dtype):
    x = inputs(shape, dtype)
    lora_A, lora_B, scaling = stacked_adapters()
    expected = per_row_loop(x, row_adapter_tensor(), lora_A, lora_B, scaling, ranks=RANKS)
    actual = grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
def test_grouped_lora_returns_the_adapters_dtype_and_the_input_shape_with_out_features(dtype):
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES), dtype)
    delta = grouped_lora(x, row_adapter_tensor(), *stacked_adapters())
    assert delta.dtype == torch.float32
    assert delta.shape == (len(ROW_ADAPTER), 3, OUT_FEATURES)


def test_base_only_rows_get_an_exact_zero_delta():
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    delta = grouped_lora(x, row_adapter_tensor(), *stacked_adapters())
    base_only = row_adapter_tensor() == -1
    assert torch.equal(delta[base_only], torch.zeros_like(delta[base_only]))


def test_zero_padding_a_rank_leaves_the_delta_unchanged():
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    padded_A = torch.cat([lora_A, torch.zeros(len(RANKS), 4, IN_FEATURES)], dim=1)
    padded_B = torch.cat([lora_B, torch.zeros(len(RANKS), OUT_FEATURES, 4)], dim=2)
    torch.testing.assert_close(
        grouped_lora(x, row_adapter_tensor(), padded_A, padded_B, scaling),
        grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling),
        atol=1e-6,
        rtol=1e-6,
    )


def test_grouped_lora_mutates_none_of_its_inputs():
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    row_adapter = row_adapter_tensor()
    before = [tensor.clone() for tensor in (x, row_adapter, lora_A, lora_B, scaling)]
    grouped_lora(x, row_adapter, lora_A, lora_B, scaling)
    for original, after in zip(before, (x, row_adapter, lora_A, lora_B, scaling)):
        assert torch.equal(original, after)


@pytest.mark.parametrize(
    "shape", [(len(ROW_ADAPTER), IN_FEATURES), (len(ROW_ADAPTER), 3, IN_FEATURES)], ids=["2d", "3d"]
)
def test_gradients_wrt_x_and_stacked_factors_equal_the_loops(shape):
    upstream = torch.randn(*shape[:-1], OUT_FEATURES, generator=torch.Generator().manual_seed(2))

    def gradients(function):
        x = inputs(shape).requires_grad_(True)
        lora_A, lora_B, scaling = stacked_adapters()
        lora_A.requires_grad_(True)
        lora_B.requires_grad_(True)
        (function(x, row_adapter_tensor(), lora_A, lora_B, scaling) * upstream).sum().backward()
        return x.grad, lora_A.grad, lora_B.grad

    for actual, expected in zip(gradients(grouped_lora), gradients(per_row_loop)):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_no_row_uses_gets_zero_gradient():
    x = inputs((3, 2, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    grouped_lora(x, torch.tensor([0, -1, 2]), lora_A, lora_B, scaling).sum().backward()
    assert torch.count_nonzero(lora_A.grad[1]) == 0
    assert torch.count_nonzero(lora_B.grad[1]) == 0


def test_triton_backend_raises_naming_the_op(monkeypatch):
    monkeypatch.setattr(backend, "_override", None)  # the environment variable decides
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    x = inputs((len(ROW_ADAPTER), IN_FEATURES))
    with pytest.raises(RuntimeError, match="grouped_lora"):
        grouped_lora(x, row_adapter_tensor(), *stacked_adapters())


def _bad(name):
    """The test operands with one of them made wrong: ``name`` says which and how."""
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    operands = {
        "x": x,
        "row_adapter": row_adapter_tensor(),
        "lora_A": lora_A,
        "lora_B": lora_B,
        "scaling": scaling,
    }
    if name == "x-width":
        operands["x"] = x[..., :-1]
    elif name == "lora_B-rank":
        operands["lora_B"] = lora_B[..., :-1]
    elif name == "lora_A-dims":
        operands["lora_A"] = lora_A[0]
    elif name == "scaling-count":
        operands["scaling"] = scaling[:-1]
    elif name == "row_adapter-count":
        operands["row_adapter"] = operands["row_adapter"][:-1]
    elif name == "row_adapter-float":
        operands["row_adapter"] = operands["row_adapter"].float()
    elif name == "adapter-dtypes":
        operands["lora_B"] = lora_B.bfloat16()
    return operands


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("x-width", ValueError, r"x has shape \(7, 3, 36\); expected \[B, ..., 37\]"),
        ("lora_B-rank", ValueError, r"lora_A \(3, 5, 37\) and lora_B \(3, 53, 4\) do not stack"),
        ("lora_A-dims", ValueError, r"lora_A has shape \(5, 37\); expected \[n, r, in\]"),
        ("scaling-count", ValueError, r"scaling has shape \(2,\); expected \(3,\), one per adapter"),
        ("row_adapter-count", ValueError, r"row_adapter has shape \(6,\); expected \(7,\), one per row of x"),
        ("row_adapter-float", TypeError, "row_adapter has dtype torch.float32; expected an integer dtype"),
        ("adapter-dtypes", TypeError, "lora_A has dtype torch.float32 but lora_B has torch.bfloat16"),
    ],
)
def test_bad_operands_are_refused_naming_the_operand(bad, error, message):
    with pytest.raises(error, match="grouped_lora: " + message):
        grouped_lora(**_bad(bad))


def test_the_cpu_grouping_equals_the_per_row_gather_of_other_devices():
    from lora_engine.reference import grouped_lora as reference

    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    grouped = reference.grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling)
    gathered = reference._gathered_per_row(x, row_adapter_tensor(), lora_A, lora_B, scaling)
    torch.testing.assert_close(grouped, gathered, atol=1e-5, rtol=1e-5)


def test_row_segments_give_an_adapter_with_rows_apart_their_indices_and_the_others_slices():
    from lora_engine.reference.grouped_lora import row_segments

    segments = row_segments(torch.tensor([5, 0, 5, -1, 1, 1, 3, 5]), 7)
    assert segments.adapters == [0, 1, 3, 5]
    assert segments.spans[:3] == ((0, slice(1, 2)), (1, slice(4, 6)), (3, slice(6, 7)))
    assert segments.spans[3][1].tolist() == [0, 2, 7] and segments.spans[3][1].dtype == torch.long


def test_row_segments_refuse_a_row_past_the_stacked_adapters():
    from lora_engine.reference.grouped_lora import row_segments

    with pytest.raises(IndexError, match="row 1 runs adapter 3; only 3 are stacked"):
        row_segments(torch.tensor([0, 3]), 3)


@pytest.mark.parametrize(
    "row_adapter",
    [(1, 1, 0, -1, 2, 2), (0, 1, 2), (2, 2, 2, 2), (-1, -1)],
    ids=["slices", "one-row-each", "one", "base"],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["out", "delta"])
def test_grouped_lora_on_row_slices_equals_per_row_loop(row_adapter, in_place):
    x = inputs((len(row_adapter), 3, IN_FEATURES))
    routing = torch.tensor(row_adapter)
    lora_A, lora_B, scaling = stacked_adapters()
    base = torch.randn(len(row_adapter), 3, OUT_FEATURES, generator=torch.Generator().manual_seed(4))
    want = base + per_row_loop(x, routing, lora_A, lora_B, scaling, ranks=RANKS)
    if in_place:
        got = grouped_lora(x, routing, lora_A, lora_B, scaling, out=base.clone())
    else:
        got = base + grouped_lora(x, routing, lora_A, lora_B, scaling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_adding_fp32_adapters_into_a_bf16_out_rounds_the_sum_once():
    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    base = torch.randn(len(ROW_ADAPTER), 3, OUT_FEATURES, generator=torch.Generator().manual_seed(4))
    base = base.to(torch.bfloat16)
    delta = grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling)
    out = grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling, out=base.clone())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (base + delta).to(torch.bfloat16), atol=0, rtol=0)


def test_adding_into_out_on_the_cpu_equals_out_plus_delta_with_precomputed_segments():
    from lora_engine.ops.grouped_lora import segment_rows

    x = inputs((len(ROW_ADAPTER), 3, IN_FEATURES))
    lora_A, lora_B, scaling = stacked_adapters()
    base = torch.randn(len(ROW_ADAPTER), 3, OUT_FEATURES, generator=torch.Generator().manual_seed(4))
    want = base + per_row_loop(x, row_adapter_tensor(), lora_A, lora_B, scaling, ranks=RANKS)
    segments = segment_rows(row_adapter_tensor(), 3, len(RANKS))
    out = base.clone()
    returned = grouped_lora(x, row_adapter_tensor(), lora_A, lora_B, scaling, out=out, segments=segments)
    assert returned is out
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], base[1]) and torch.equal(out[5], base[5])  # base-only rows untouched
