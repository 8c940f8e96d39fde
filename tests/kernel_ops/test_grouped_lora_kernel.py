"""The Triton ``grouped_lora`` (shrink + expand over tokens grouped by adapter, under the interpreter) equals running
each row alone with its own adapter: mixed ranks, base-only rows, one row per adapter, all rows on one adapter,
adapters spanning several tiles; in place into a base output; and its gradients equal the reference's."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops import grouped_lora as grouped_op
from lora_engine.reference.grouped_lora import grouped_lora as reference_grouped_lora

pytestmark = pytest.mark.usefixtures("kernels")

IN_FEATURES, OUT_FEATURES = 37, 53  # no multiple of any tile


def _adapters(ranks, dtype=torch.float32, seed=0):
    """``(A [n, r_max, in], B [n, out, r_max], scaling [n])``, each adapter zero-padded past its own rank."""
    generator = torch.Generator().manual_seed(seed)
    lora_A = torch.zeros(len(ranks), max(ranks), IN_FEATURES)
    lora_B = torch.zeros(len(ranks), OUT_FEATURES, max(ranks))
    for index, rank in enumerate(ranks):
        lora_A[index, :rank] = torch.randn(rank, IN_FEATURES, generator=generator)
        lora_B[index, :, :rank] = torch.randn(OUT_FEATURES, rank, generator=generator)
    scaling = torch.linspace(0.5, 2.0, len(ranks))
    return lora_A.to(dtype), lora_B.to(dtype), scaling


def _rows(batch, tokens, dtype=torch.float32):
    return torch.randn(batch, tokens, IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(dtype)


def _each_row_alone(x, row_adapter, lora_A, lora_B, scaling, ranks):
    """Row by row, each with its own adapter cut to its own rank (no padding, no grouping); zeros for base rows."""
    rows = []
    for row, adapter in zip(x, row_adapter.tolist()):
        if adapter < 0:
            rows.append(torch.zeros(*row.shape[:-1], OUT_FEATURES, dtype=lora_A.dtype))
            continue
        rank = ranks[adapter]
        single = (lora_A[adapter : adapter + 1, :rank], lora_B[adapter : adapter + 1, :, :rank])
        alone = reference_grouped_lora(
            row[None], torch.zeros(1, dtype=torch.long), *single, scaling[adapter, None]
        )
        rows.append(alone[0])
    return torch.stack(rows)


CASES = {
    "mixed-ranks-and-base-rows": ((5, 2, 3), (2, -1, 0, 0, 1, -1, 2), 3),
    "one-row-per-adapter": ((4, 1, 3, 2), (3, 0, 2, 1), 2),
    "all-rows-on-one-adapter": ((2, 6), (1, 1, 1, 1, 1), 1),
    "adapters-spanning-several-tiles": ((3, 4), (0, 1, -1, 0), 20),  # 20 tokens per row > 16 per tile
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_grouped_kernels_equal_each_row_run_alone(case, dtype):
    ranks, routing, tokens = CASES[case]
    row_adapter = torch.tensor(routing)
    lora_A, lora_B, scaling = _adapters(ranks, dtype)
    x = _rows(len(routing), tokens, dtype)
    delta = grouped_op.grouped_lora(x, row_adapter, lora_A, lora_B, scaling)
    # The oracle runs in fp32: a bf16 reference rounds its rank-sized hidden in bf16 at another point than the
    # kernel (which accumulates in fp32), so bf16 vs bf16 would compare two roundings, not the grouping.
    expected = _each_row_alone(x.float(), row_adapter, lora_A.float(), lora_B.float(), scaling, ranks)
    assert delta.dtype == dtype and delta.shape == expected.shape
    # bf16 keeps 8 significant bits: its error scales with the largest terms, not with a value that cancels.
    scale = expected.abs().max().item()
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2 * scale, "rtol": 2e-2}
    )
    torch.testing.assert_close(delta.float(), expected, **tolerance)
    assert torch.count_nonzero(delta[row_adapter < 0]) == 0


def test_out_gets_the_delta_added_in_place_and_base_rows_keep_their_bits():
    ranks, routing, tokens = CASES["mixed-ranks-and-base-rows"]
    row_adapter = torch.tensor(routing)
    lora_A, lora_B, scaling = _adapters(ranks)
    x = _rows(len(routing), tokens)
    base = torch.randn(
        len(routing), tokens, OUT_FEATURES, generator=torch.Generator().manual_seed(5)
    ).bfloat16()
    base[1, 0, 0] = -0.0  # a base row keeps even the sign of a zero: it is never written
    out = base.clone()
    assert grouped_op.grouped_lora(x, row_adapter, lora_A, lora_B, scaling, out=out) is out
    expected = (base + reference_grouped_lora(x, row_adapter, lora_A, lora_B, scaling)).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    assert torch.equal(out[row_adapter < 0].view(torch.int16), base[row_adapter < 0].view(torch.int16))


def test_segments_computed_once_serve_every_layer_and_equal_fresh_ones():
    ranks, routing, tokens = CASES["mixed-ranks-and-base-rows"]
    row_adapter = torch.tensor(routing)
    segments = grouped_op.segment_rows(row_adapter, tokens, len(ranks))
    x = _rows(len(routing), tokens)
    for seed in (0, 1):  # two "layers" with their own factors, one segmentation
        lora_A, lora_B, scaling = _adapters(ranks, seed=seed)
        reused = grouped_op.grouped_lora(x, row_adapter, lora_A, lora_B, scaling, segments=segments)
        assert torch.equal(reused, grouped_op.grouped_lora(x, row_adapter, lora_A, lora_B, scaling))


def test_segments_put_each_adapter_in_its_own_tiles_and_skip_base_rows():
    segments = grouped_op.segment_rows(torch.tensor([1, -1, 0, 1]), 2, 3)
    # Tokens of row 1 (base) first, then adapter 0's (row 2), then adapter 1's (rows 0 and 3), each stably.
    assert segments.order.tolist() == [2, 3, 4, 5, 0, 1, 6, 7]
    real = segments.tile_adapter >= 0
    assert segments.tile_adapter[real].tolist() == [0, 1]  # adapter 2 has no tokens, so no tile
    assert segments.tile_start[real].tolist() == [2, 4] and segments.tile_end[real].tolist() == [4, 8]


def test_all_base_rows_leave_out_untouched():
    lora_A, lora_B, scaling = _adapters((2, 3))
    out = torch.randn(3, 2, OUT_FEATURES)
    original = out.clone()
    grouped_op.grouped_lora(_rows(3, 2), torch.full((3,), -1), lora_A, lora_B, scaling, out=out)
    assert torch.equal(out, original)


def test_gradients_through_the_kernels_equal_the_references():
    ranks, routing, tokens = CASES["mixed-ranks-and-base-rows"]
    row_adapter = torch.tensor(routing)
    upstream = torch.randn(len(routing), tokens, OUT_FEATURES, generator=torch.Generator().manual_seed(2))

    def gradients(function):
        x = _rows(len(routing), tokens).requires_grad_(True)
        lora_A, lora_B, scaling = (tensor.requires_grad_(True) for tensor in _adapters(ranks))
        (function(x, row_adapter, lora_A, lora_B, scaling) * upstream).sum().backward()
        return x.grad, lora_A.grad, lora_B.grad, scaling.grad

    for ours, theirs in zip(gradients(grouped_op.grouped_lora), gradients(reference_grouped_lora)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_out_is_refused_when_autograd_would_need_to_see_the_add():
    lora_A, lora_B, scaling = _adapters((2,))
    lora_A.requires_grad_(True)
    with pytest.raises(ValueError, match="grouped_lora: out= adds in place"):
        grouped_op.grouped_lora(
            _rows(2, 1), torch.zeros(2, dtype=torch.long), lora_A, lora_B, scaling, out=torch.zeros(2, 1, 53)
        )


def test_the_op_runs_the_kernels_under_the_triton_backend(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(grouped_op, "reference_grouped_lora", fail)
    lora_A, lora_B, scaling = _adapters((2, 3))
    out = torch.zeros(3, 2, OUT_FEATURES)
    grouped_op.grouped_lora(_rows(3, 2), torch.tensor([1, -1, 0]), lora_A, lora_B, scaling, out=out)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0
