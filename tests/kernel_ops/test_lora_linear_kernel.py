"""The Triton ``lora_linear`` (under the interpreter) against the reference: forward and every gradient, odd
shapes, 3-D and strided inputs, strided weights and bias, fp32/fp16/bf16, bias, fan_in_fan_out, and dropout (the
two backends draw the same mask from the same seed tensor, bit for bit)."""

import pytest
import torch
from triton_interpreter import kernels_fixture  # noqa: F401  (registers the `kernels` fixture)

from lora_engine.ops.lora_linear import draw_seed, lora_linear, reference_lora_linear, triton_lora_linear
from lora_engine.reference import lora_linear as reference

pytestmark = pytest.mark.usefixtures("kernels")

# Per compared tensor's dtype (the project's tolerances, as in tests/test_reference_ops.py). The kernel rounds
# once where the reference rounds the base output, the delta and their sum, and it scales after a matmul where
# the reference scales before: a few ulps apart in half precision.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
HALF = [torch.float16, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Not multiples of any tile: N = 37 rows, in = 45, out = 29, r = 3.
ROWS, IN_FEATURES, OUT_FEATURES, RANK = 37, 45, 29, 3


def _operands(
    dtype,
    *,
    leading=(ROWS,),
    rank=RANK,
    bias=True,
    fan_in_fan_out=False,
    adapter_dtype=torch.float32,
):
    """x, weight (frozen), bias, lora_A, lora_B; x, bias and the adapters require grad."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, dtype=dtype, grad=True):
        tensor = (torch.randn(*shape, generator=generator) * scale).to(dtype)
        return tensor.requires_grad_(grad)

    x = rand(*leading, IN_FEATURES)
    weight = rand(OUT_FEATURES, IN_FEATURES, scale=IN_FEATURES**-0.5, grad=False)
    if fan_in_fan_out:
        weight = weight.T.contiguous()  # stored [in, out], as transformers' Conv1D
    bias_ = rand(OUT_FEATURES) if bias else None
    lora_A = rand(rank, IN_FEATURES, scale=IN_FEATURES**-0.5, dtype=adapter_dtype)
    lora_B = rand(OUT_FEATURES, rank, scale=rank**-0.5, dtype=adapter_dtype)
    return x, weight, bias_, lora_A, lora_B


def _assert_close(got, want, compute_dtype=None):
    """Equal dtype and shape, and values within the tolerance of the dtype they were computed in (by default
    their own). ``atol`` is taken relative to the largest entry (at least 1): a sum's rounding error scales with
    its terms, not with its possibly cancelled result, and the adapter gradients are sums over all rows."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tolerance = TOLERANCE[compute_dtype or want.dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=tolerance * scale, rtol=tolerance)


def _assert_matches_reference(got_fn, want_fn, inputs, compute_dtype=None):
    """Run both, compare outputs and the gradients of every input that requires grad, for one upstream grad."""
    got, want = got_fn(), want_fn()
    _assert_close(got, want, compute_dtype)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(want.dtype)
    needing = [tensor for tensor in inputs if tensor is not None and tensor.requires_grad]
    for got_grad, want_grad in zip(
        torch.autograd.grad(got, needing, grad_out), torch.autograd.grad(want, needing, grad_out)
    ):
        _assert_close(got_grad, want_grad, compute_dtype)


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def _both(kernels, operands, scaling, dropout_p=0.0, seed=None, fan_in_fan_out=False):
    """The op on the Triton kernels and on the reference, each a thunk, with the same dropout seed tensor."""
    seed = _seed(seed) if isinstance(seed, int) else seed

    def run(backend_op):
        return lambda: backend_op(*operands, scaling, dropout_p, seed, fan_in_fan_out)

    return run(triton_lora_linear), run(reference_lora_linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_forward_and_gradients_match_the_reference(kernels, dtype, bias, fan_in_fan_out):
    operands = _operands(dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    _assert_matches_reference(*_both(kernels, operands, 0.7, fan_in_fan_out=fan_in_fan_out), operands)


@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_NAMES.get)
def test_adapters_in_the_input_dtype_match_the_reference(kernels, dtype):
    operands = _operands(dtype, adapter_dtype=dtype)
    _assert_matches_reference(*_both(kernels, operands, 1.3), operands)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_rank_wider_than_one_rank_tile_matches_the_reference(kernels, dtype):
    operands = _operands(dtype, rank=20)  # two 16-wide rank chunks under the interpreter
    _assert_matches_reference(*_both(kernels, operands, 0.4), operands)


def _layout(name, x):
    """``x`` re-laid out without changing its values: 3-D, or non-contiguous in two ways."""
    if name == "3d":
        return x.detach().reshape(3, ROWS // 3, IN_FEATURES).requires_grad_()
    if name == "3d-transposed":  # leading dims that cannot be flattened as a view
        return x.detach().reshape(ROWS // 3, 3, IN_FEATURES).transpose(0, 1).requires_grad_()
    if name == "strided-features":  # every other column of a wider buffer
        wide = torch.zeros(x.shape[0], 2 * IN_FEATURES, dtype=x.dtype)
        wide[:, ::2] = x.detach()
        return wide[:, ::2].requires_grad_()
    raise ValueError(name)


@pytest.mark.parametrize("layout", ["3d", "3d-transposed", "strided-features"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_any_leading_dims_and_strides_match_the_reference(kernels, layout, dtype):
    x, *rest = _operands(dtype, leading=(ROWS - ROWS % 3,))
    x = _layout(layout, x)
    assert (layout == "3d") == x.is_contiguous()
    operands = (x, *rest)
    _assert_matches_reference(*_both(kernels, operands, 0.9), operands)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_each_strategy_matches_the_reference(kernels, monkeypatch, strategy, dtype, dropout_p):
    """Forced by LORA_ENGINE_LORA_GEMM; non-contiguous 3-D x with leading dims that cannot be flattened, bias."""
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", strategy)
    x, *rest = _operands(dtype, leading=(ROWS - ROWS % 3,))
    operands = (_layout("3d-transposed", x), *rest)
    _assert_matches_reference(*_both(kernels, operands, 0.6, dropout_p, seed=31), operands)


@pytest.mark.parametrize(("strategy", "dropout_p"), [("fused", 0.0), ("cublas", 0.1), ("fused", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_gradients_through_the_one_pass_over_a_strided_dy_match_the_reference(
    kernels, monkeypatch, rank, dtype, strategy, dropout_p
):
    """dxa and dB come from one read of dy (``grad_out_pass``); dA and dx consume that dxa. Non-contiguous 3-D x,
    and a dy whose features are strided (its rows still flatten to a view, so the kernel reads it strided)."""
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", strategy)
    x, *rest = _operands(dtype, leading=(ROWS - ROWS % 3,), rank=rank)
    operands = (_layout("3d-transposed", x), *rest)
    got_fn, want_fn = _both(kernels, operands, 0.6, dropout_p, seed=41)
    got, want = got_fn(), want_fn()
    wide = torch.randn(*want.shape[:-1], 2 * OUT_FEATURES, generator=torch.Generator().manual_seed(2))
    grad_out = wide.to(want.dtype)[..., ::2]
    assert not grad_out.is_contiguous() and grad_out.reshape(-1, OUT_FEATURES)._base is not None
    needing = [tensor for tensor in operands if tensor is not None and tensor.requires_grad]
    for got_grad, want_grad in zip(
        torch.autograd.grad(got, needing, grad_out), torch.autograd.grad(want, needing, grad_out)
    ):
        _assert_close(got_grad, want_grad)


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
def test_each_strategy_reads_strided_operands_and_conv1d_weights(kernels, monkeypatch, strategy):
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", strategy)
    x, weight, _, lora_A, lora_B = _operands(torch.bfloat16, fan_in_fan_out=True)
    strided_bias = torch.randn(2 * OUT_FEATURES, generator=torch.Generator().manual_seed(8))[::2].bfloat16()
    operands = (_layout("strided-features", x), weight, strided_bias.requires_grad_(), lora_A, lora_B)
    _assert_matches_reference(*_both(kernels, operands, 0.6, 0.1, seed=32, fan_in_fan_out=True), operands)


def test_auto_takes_cublas_for_few_rows_and_fused_off_cuda(kernels, monkeypatch):
    from lora_engine.kernels import strategy

    monkeypatch.delenv("LORA_ENGINE_LORA_GEMM", raising=False)
    cpu = torch.device("cpu")
    assert strategy.choose("key", strategy.SMALL_ROWS, cpu, None) == "cublas"
    assert strategy.choose("key", strategy.SMALL_ROWS + 1, cpu, None) == "fused"
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", "cuBLAS ")
    assert strategy.choose("key", 4096, cpu, None) == "cublas"


def test_an_unknown_strategy_is_refused_naming_it(kernels, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", "fastest")
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    with pytest.raises(
        ValueError, match=r"LORA_ENGINE_LORA_GEMM='fastest' is not a strategy; choose one of auto"
    ):
        triton_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None, False)


def test_under_autocast_everything_runs_in_the_autocast_dtype_as_in_the_reference(kernels):
    operands = _operands(torch.float32)  # fp32 base and adapters; autocast runs both paths in bf16

    def autocast(run):
        def run_autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run()

        return run_autocast

    got_fn, want_fn = _both(kernels, operands, 0.7)
    assert autocast(got_fn)().dtype == torch.bfloat16
    _assert_matches_reference(autocast(got_fn), autocast(want_fn), operands, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_dropout_forward_and_gradients_match_the_reference_from_the_same_seed(kernels, dropout_p, dtype):
    operands = _operands(dtype)
    _assert_matches_reference(*_both(kernels, operands, 0.6, dropout_p, seed=2024), operands)


@pytest.mark.parametrize("layout", ["3d-transposed", "strided-features"])
def test_dropout_mask_follows_the_logical_index_not_the_memory_layout(kernels, layout):
    x, *rest = _operands(torch.float32, leading=(ROWS - ROWS % 3,))
    operands = (_layout(layout, x), *rest)
    _assert_matches_reference(*_both(kernels, operands, 0.6, 0.3, seed=77), operands)


@pytest.mark.parametrize("in_features", [IN_FEATURES, 48], ids=["in-45", "in-48"])
def test_the_saved_mask_is_the_references_bit_for_bit(kernels, in_features):
    rows, p, seed = 70, 0.3, _seed(2**31 - 5)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(3))
    lora_A, lora_B = torch.randn(RANK, in_features), torch.randn(OUT_FEATURES, RANK)
    _, _, got = kernels.lora_linear.forward(x, None, None, lora_A, lora_B, 1.0, p, seed, False)
    _, _, want = reference.forward(x, None, None, lora_A, lora_B, 1.0, p, seed, False)
    assert got.dtype == torch.uint8 and got.shape == (rows, -(-in_features // 8))
    assert torch.equal(got, want)
    assert torch.equal(
        reference.unpack_keep(got, in_features), reference.keep_mask(seed, rows, in_features, p)
    )


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_backward_gives_identical_results_twice(kernels, monkeypatch, dtype, strategy):
    monkeypatch.setenv("LORA_ENGINE_LORA_GEMM", strategy)
    operands = _operands(dtype)
    out = triton_lora_linear(*operands, 0.6, 0.1, _seed(9), False)
    needing = [tensor for tensor in operands if tensor is not None and tensor.requires_grad]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    first = torch.autograd.grad(out, needing, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, needing, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_a_strided_bias_is_read_through_its_stride(kernels):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    wide = torch.randn(2 * OUT_FEATURES, generator=torch.Generator().manual_seed(5))
    strided_bias = wide[::2].requires_grad_()
    operands = (x, weight, strided_bias, lora_A, lora_B)
    _assert_matches_reference(*_both(kernels, operands, 0.8), operands)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_strided_weights_and_adapters_are_read_through_their_strides(kernels, fan_in_fan_out):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32, fan_in_fan_out=fan_in_fan_out)

    def every_other_column(tensor):
        wide = torch.zeros(tensor.shape[0], 2 * tensor.shape[1], dtype=tensor.dtype)
        wide[:, ::2] = tensor.detach()
        return wide[:, ::2].requires_grad_(tensor.requires_grad)

    operands = (
        x,
        every_other_column(weight),
        bias,
        every_other_column(lora_A),
        lora_B.detach().T.contiguous().T,
    )
    operands[4].requires_grad_()
    assert not any(tensor.is_contiguous() for tensor in (operands[1], operands[3], operands[4]))
    _assert_matches_reference(
        *_both(kernels, operands, 0.8, 0.2, seed=6, fan_in_fan_out=fan_in_fan_out), operands
    )


def test_dropout_through_the_op_zeroes_and_rescales_like_inverted_dropout(kernels):
    p, rows, width = 0.25, 64, 48
    ones = torch.ones(rows, width)
    identity_A, identity_B = torch.eye(width), torch.eye(width)  # the low-rank path is the identity
    out = lora_linear(ones, None, None, identity_A, identity_B, 1.0, dropout_p=p)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / out.numel()) ** 0.5
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    second = lora_linear(ones, None, None, identity_A, identity_B, 1.0, dropout_p=p)
    assert not torch.equal(out, second)  # a fresh seed per call
    assert draw_seed(ones.device).dtype == torch.int64


def test_without_weight_only_the_low_rank_term_is_returned_in_the_adapter_dtype(kernels):
    x, _, _, lora_A, lora_B = _operands(torch.bfloat16)
    operands = (x, None, None, lora_A, lora_B)
    got_fn, want_fn = _both(kernels, operands, 2.0)
    assert got_fn().dtype == torch.float32
    _assert_matches_reference(got_fn, want_fn, operands)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_weight_and_bias_gradients_are_computed_when_they_require_grad(kernels, fan_in_fan_out):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32, fan_in_fan_out=fan_in_fan_out)
    operands = (x, weight.requires_grad_(), bias, lora_A, lora_B)
    _assert_matches_reference(*_both(kernels, operands, 0.5, fan_in_fan_out=fan_in_fan_out), operands)


def test_only_the_gradients_asked_for_are_computed(kernels):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    x.requires_grad_(False)
    bias.requires_grad_(False)
    lora_A.requires_grad_(False)
    out = triton_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None, False)
    (grad_B,) = torch.autograd.grad(out.sum(), [lora_B])
    want = reference_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None, False)
    torch.testing.assert_close(grad_B, torch.autograd.grad(want.sum(), [lora_B])[0])


def test_empty_input_gives_empty_output_and_zero_adapter_gradients(kernels):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32, leading=(0,))
    out = triton_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, _seed(3), False)
    assert out.shape == (0, OUT_FEATURES)
    grad_A, grad_B = torch.autograd.grad(out.sum(), [lora_A, lora_B])
    assert not grad_A.any() and not grad_B.any()


def test_saves_the_input_once_the_packed_mask_and_no_dropped_copy(kernels):
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        triton_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3, _seed(5), False)
    big = [tensor for tensor in saved if tensor.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert any(tensor.shape == (ROWS, RANK) for tensor in saved)  # the [N, r] product
    masks = [tensor for tensor in saved if tensor.dtype == torch.uint8]
    assert [mask.shape for mask in masks] == [(ROWS, -(-IN_FEATURES // 8))]  # one bit per element of x


def test_the_op_runs_the_kernel_under_the_triton_backend(kernels, monkeypatch):
    def fail(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "eager_lora_linear", fail)
    monkeypatch.setattr(reference, "forward", fail)
    x, weight, bias, lora_A, lora_B = _operands(torch.float32)
    out = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
    want = triton_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None, False)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": lambda x: x.double()}, "x has dtype torch.float64"),
        ({"lora_B": lambda b: b.half()}, r"lora_A \(torch.float32\) and lora_B \(torch.float16\)"),
        ({"lora_A": lambda a: a[:, :-1]}, r"x \[..., 45\], lora_A \(3, 44\)"),
        ({"weight": lambda w: w[:-1]}, r"weight has shape \(28, 45\); expected \(29, 45\)"),
        ({"weight": lambda w: w.half()}, "weight has dtype torch.float16 but x has torch.float32"),
        ({"bias": lambda b: b[:-1]}, r"bias has shape \(28,\); expected \(29,\)"),
    ],
)
def test_bad_operands_are_refused_naming_the_operand(kernels, change, message):
    named = dict(zip(["x", "weight", "bias", "lora_A", "lora_B"], _operands(torch.float32)))
    for name, transform in change.items():
        named[name] = transform(named[name].detach())
    with pytest.raises((TypeError, ValueError), match=message):
        triton_lora_linear(*named.values(), 0.5, 0.0, None, False)
