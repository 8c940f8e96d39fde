"""Mixed-adapter batches: ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``.

Row ``b`` of a mixed batch must compute exactly what the whole model computes with ``adapter_names[b]`` as its
only active adapter (``"__base__"``: with adapters disabled). The references are single-adapter runs of our own
model, and peft 0.21.2's mixed batches where peft supports the case.

Two adapters of different ranks and different targets: ``math`` (an embedding among its targets) and ``code``,
which also keeps a trained copy of ``lm_head`` (``modules_to_save``). peft raises ``KeyError`` when a row is routed
to an adapter that has no copy in a ``modules_to_save`` wrapper; ours runs the original module for those rows, so
there ours is checked against single-adapter runs only.
"""

import copy

import peft
import pytest
import torch
from conftest import VOCAB_SIZE, copy_lora_weights

import lora_engine
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.modules_to_save import ModulesToSaveWrapper

FACTORY_FIXTURES = {"llama": "llama_factory", "gpt2": "gpt2_factory"}

ADAPTERS = {
    "llama": {
        "math": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
        "code": {
            "r": 2,
            "lora_alpha": 6,
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "modules_to_save": ["lm_head"],
        },
    },
    "gpt2": {
        "math": {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "c_attn"], "fan_in_fan_out": True},
        "code": {
            "r": 2,
            "lora_alpha": 6,
            "target_modules": ["c_attn", "c_fc"],
            "fan_in_fan_out": True,
            "modules_to_save": ["lm_head"],
        },
    },
}
ROUTES = ["math", "__base__", "code", "math", "code"]  # not a palindrome: reversed rows must fail
PAD_TOKEN_ID = 0


# ---------------------------------------------------------------------------------------------- helpers
def build_pair(make, model_kind: str, modules_to_save: bool = True):
    """(peft model, our model) in eval mode on identical bases, holding the same non-trivial adapters.

    ``math`` is active. The saved ``lm_head`` copy of ``code`` is perturbed, so that it differs from the original.
    """
    models = []
    for library in (peft, lora_engine):
        model = None
        for name, config in copy.deepcopy(ADAPTERS[model_kind]).items():
            if not modules_to_save:
                config.pop("modules_to_save", None)
            config = library.LoraConfig(init_lora_weights=False, **config)
            if model is None:
                model = library.get_peft_model(make(), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        models.append(model.eval())
    theirs, ours = models
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(getattr(module, "modules_to_save", None), torch.nn.ModuleDict):
                weight = module.modules_to_save["code"].weight
                noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
                weight.copy_(weight + 0.1 * noise)
    copy_lora_weights(theirs, ours)
    return theirs, ours


def build_ours(request, model_kind: str, modules_to_save: bool = True):
    return build_pair(request.getfixturevalue(FACTORY_FIXTURES[model_kind]), model_kind, modules_to_save)[1]


def batch_input_ids(rows: int = len(ROUTES)) -> torch.Tensor:
    return torch.randint(1, VOCAB_SIZE, (rows, 7), generator=torch.Generator().manual_seed(0))


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``; rows 1 and 2 are left-padded."""
    input_ids = batch_input_ids()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, :1] = 0
    return input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID), attention_mask


def logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def run_with_only(model, adapter_name: str, run):
    """``run()`` with ``adapter_name`` the one active adapter (``"__base__"``: adapters disabled)."""
    if adapter_name == "__base__":
        with model.disable_adapter():
            return run()
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        return run()
    finally:
        model.set_adapter(previous)


def rows_of_single_adapter_runs(model, routes: list[str], run) -> torch.Tensor:
    """Row ``b`` of ``run()`` with ``routes[b]`` the only adapter: the reference for a mixed batch."""
    outputs = {name: run_with_only(model, name, run) for name in set(routes)}
    return torch.stack([outputs[name][row] for row, name in enumerate(routes)])


def routing_left_on_layers(model) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer | ModulesToSaveWrapper) and module.routing is not None
    ]


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("model_kind", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_single_adapter_runs(request, model_kind):
    ours = build_ours(request, model_kind)
    input_ids = batch_input_ids()
    expected = rows_of_single_adapter_runs(ours, ROUTES, lambda: logits(ours, input_ids))
    actual = logits(ours, input_ids, adapter_names=ROUTES)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_kind", ["llama", "gpt2"])
def test_mixed_batch_logits_equal_peft(request, model_kind):
    theirs, ours = build_pair(request.getfixturevalue(FACTORY_FIXTURES[model_kind]), model_kind, False)
    input_ids = batch_input_ids()
    torch.testing.assert_close(
        logits(ours, input_ids, adapter_names=ROUTES),
        logits(theirs, input_ids, adapter_names=ROUTES),
        atol=1e-5,
        rtol=1e-5,
    )


# Row layouts the CPU path tells apart: each adapter's rows together (slices of the batch, added in place), one
# row per adapter, every row on one adapter; ROUTES has an adapter's rows apart (gathered, then put back).
LAYOUTS = {
    "together": ["math", "math", "__base__", "code", "code"],
    "one-row-each": ["code", "math"],
    "one-adapter": ["code"] * 4,
    "apart": ROUTES,
}


@pytest.mark.parametrize("routes", LAYOUTS.values(), ids=LAYOUTS)
def test_mixed_batch_rows_equal_single_adapter_runs_in_every_row_layout(llama_factory, routes):
    ours = build_pair(llama_factory, "llama")[1]
    input_ids = batch_input_ids(len(routes))
    expected = rows_of_single_adapter_runs(ours, routes, lambda: logits(ours, input_ids))
    torch.testing.assert_close(logits(ours, input_ids, adapter_names=routes), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routes", LAYOUTS.values(), ids=LAYOUTS)
def test_mixed_batch_logits_equal_peft_in_every_row_layout(llama_factory, routes):
    theirs, ours = build_pair(llama_factory, "llama", modules_to_save=False)
    input_ids = batch_input_ids(len(routes))
    torch.testing.assert_close(
        logits(ours, input_ids, adapter_names=routes),
        logits(theirs, input_ids, adapter_names=routes),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("routes", [LAYOUTS["together"], LAYOUTS["apart"]], ids=["together", "apart"])
def test_mixed_batch_of_a_bf16_model_with_fp32_adapters_equals_single_adapter_runs(llama_factory, routes):
    ours = build_pair(lambda: llama_factory().to(torch.bfloat16), "llama")[1]
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.lora_A["math"].weight.dtype == torch.float32
    input_ids = batch_input_ids(len(routes))
    expected = rows_of_single_adapter_runs(ours, routes, lambda: logits(ours, input_ids))
    actual = logits(ours, input_ids, adapter_names=routes)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


def test_mixed_batch_through_a_saved_module_equals_peft_where_peft_supports_it(llama_factory):
    # peft routes through its modules_to_save wrapper only when every routed adapter has a copy there.
    theirs, ours = build_pair(llama_factory, "llama")
    theirs.set_adapter("code")
    ours.set_adapter("code")
    routes = ["code", "__base__", "code", "__base__", "__base__"]
    input_ids = batch_input_ids()
    torch.testing.assert_close(
        logits(ours, input_ids, adapter_names=routes),
        logits(theirs, input_ids, adapter_names=routes),
        atol=1e-5,
        rtol=1e-5,
    )


def test_rows_of_an_adapter_without_a_saved_copy_run_the_original_module(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    input_ids = batch_input_ids()
    with ours.disable_adapter():
        base = logits(ours, input_ids)
    # Rows routed to "math" (no lm_head copy) differ from the base only through math's LoRA layers, which
    # leave the last hidden state; the head applied to it must be the original lm_head.
    hidden = ours(input_ids=input_ids, adapter_names=ROUTES, output_hidden_states=True).hidden_states[-1]
    head = ours.get_base_model().lm_head.original_module
    mixed = logits(ours, input_ids, adapter_names=ROUTES)
    math_rows = [row for row, name in enumerate(ROUTES) if name == "math"]
    torch.testing.assert_close(mixed[math_rows], head(hidden[math_rows]).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[math_rows], base[math_rows])


def test_batch_of_only_base_rows_equals_the_base_model(request):
    ours = build_ours(request, "llama")
    input_ids = batch_input_ids()
    base = request.getfixturevalue("llama_factory")()
    routes = ["__base__"] * len(ROUTES)
    torch.testing.assert_close(logits(ours, input_ids, adapter_names=routes), logits(base, input_ids))


def test_plain_forward_after_a_mixed_batch_uses_the_active_adapter_again(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    input_ids = batch_input_ids()
    before = logits(ours, input_ids)
    logits(ours, input_ids, adapter_names=ROUTES)
    assert routing_left_on_layers(ours) == []
    torch.testing.assert_close(logits(ours, input_ids), before, atol=0, rtol=0)


def test_routing_is_cleared_when_the_forward_raises(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    input_ids = batch_input_ids()
    out_of_vocabulary = input_ids.clone()
    out_of_vocabulary[0, 0] = VOCAB_SIZE + 5
    with pytest.raises(IndexError):
        ours(input_ids=out_of_vocabulary, adapter_names=ROUTES)
    assert routing_left_on_layers(ours) == []


# ---------------------------------------------------------------------------------------------- generate
def generation_kwargs(num_beams: int) -> dict:
    input_ids, attention_mask = left_padded_batch()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "num_beams": num_beams,
        "pad_token_id": PAD_TOKEN_ID,
    }


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams-3"])
@pytest.mark.parametrize("model_kind", ["llama", "gpt2"])
def test_mixed_generate_equals_single_adapter_generation_row_by_row(request, model_kind, num_beams):
    ours = build_ours(request, model_kind)
    kwargs = generation_kwargs(num_beams)
    expected = rows_of_single_adapter_runs(ours, ROUTES, lambda: ours.generate(**kwargs))
    assert torch.equal(ours.generate(**kwargs, adapter_names=ROUTES), expected)


@pytest.mark.parametrize(
    "routes", [LAYOUTS["together"], LAYOUTS["one-adapter"][:3]], ids=["together", "one-adapter"]
)
def test_mixed_generate_equals_single_adapter_generation_when_each_adapters_rows_are_together(
    llama_factory, routes
):
    ours = build_pair(llama_factory, "llama")[1]
    kwargs = generation_kwargs(1)
    kwargs["input_ids"], kwargs["attention_mask"] = (
        kwargs["input_ids"][: len(routes)],
        kwargs["attention_mask"][: len(routes)],
    )
    expected = rows_of_single_adapter_runs(ours, routes, lambda: ours.generate(**kwargs))
    assert torch.equal(ours.generate(**kwargs, adapter_names=routes), expected)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams-3"])
def test_mixed_generate_equals_peft(llama_factory, num_beams):
    theirs, ours = build_pair(llama_factory, "llama", modules_to_save=False)
    kwargs = generation_kwargs(num_beams)
    assert torch.equal(
        ours.generate(**kwargs, adapter_names=ROUTES), theirs.generate(**kwargs, adapter_names=ROUTES)
    )


def test_mixed_generate_routes_every_returned_sequence_with_its_input_row(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    # top_k=1 sampling is greedy but goes through the sampling path, which repeats each row per sequence.
    kwargs = {**generation_kwargs(1), "do_sample": True, "top_k": 1, "num_return_sequences": 2}
    routes_per_sequence = [name for name in ROUTES for _ in range(2)]
    expected = rows_of_single_adapter_runs(ours, routes_per_sequence, lambda: ours.generate(**kwargs))
    assert torch.equal(ours.generate(**kwargs, adapter_names=ROUTES), expected)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_adapter_name_is_refused_by_name(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    with pytest.raises(ValueError, match="non-existing adapter.*'physics'"):
        ours(input_ids=batch_input_ids(2), adapter_names=["math", "physics"])


@pytest.mark.parametrize("entry_point", ["forward", "generate"])
def test_adapter_names_of_the_wrong_length_are_refused_with_both_numbers(llama_factory, entry_point):
    ours = build_pair(llama_factory, "llama")[1]
    run = ours if entry_point == "forward" else ours.generate
    with pytest.raises(ValueError, match=r"\(3\).*\(5\)"):
        run(input_ids=batch_input_ids(5), adapter_names=["math", "code", "__base__"])


def test_mixed_batch_is_refused_in_training_mode(llama_factory):
    ours = build_pair(llama_factory, "llama")[1].train()
    with pytest.raises(ValueError, match="training mode"):
        ours(input_ids=batch_input_ids(2), adapter_names=["math", "code"])


def test_mixed_batch_is_refused_while_an_adapter_is_merged(llama_factory):
    ours = build_pair(llama_factory, "llama")[1]
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        ours(input_ids=batch_input_ids(2), adapter_names=["math", "code"])


@pytest.mark.parametrize("entry_point", ["forward", "generate"])
def test_a_single_str_instead_of_a_list_is_refused(llama_factory, entry_point):
    ours = build_pair(llama_factory, "llama")[1]
    run = ours if entry_point == "forward" else ours.generate
    with pytest.raises(TypeError, match="list of adapter names"):
        run(input_ids=batch_input_ids(2), adapter_names="math")
