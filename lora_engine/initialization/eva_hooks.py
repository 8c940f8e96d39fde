"""The forward hooks EVA puts on the layers it initialises, and the default ways to turn a layer's input into
the rows EVA decomposes (peft 0.21's ``peft.tuners.lora.eva`` helpers, same names and signatures).

``InputFingerprint`` records a digest of a layer's first input, so that layers fed the same tensor (q, k and v
projections) share one SVD; ``InputSvd`` folds every input into an ``IncrementalPCA`` and marks the components
that stopped moving (cosine similarity ≥ ``tau`` between two batches).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from lora_engine.initialization.incremental_pca import IncrementalPCA


def prepare_model_inputs_fn_language_modeling(model_input, peft_config) -> torch.Tensor:
    """The ``[tokens, 2]`` (batch, position) indices of the tokens EVA uses: those the ``attention_mask`` keeps
    and, with ``eva_config.use_label_mask``, whose ``labels`` are not ``label_mask_value``. ``TypeError`` if
    ``model_input`` is not a dict."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and ("labels" in model_input):
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The rows of ``layer_input`` (a tensor, or a tuple whose first item is one) at the indices
    ``model_input`` holds (``prepare_model_inputs_fn_language_modeling``'s result)."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def prepare_layer_inputs_fn_default(layer_input, model_input, layer_name) -> torch.Tensor:
    """``layer_input`` (or its first item) with all dimensions but the last flattened: ``[rows, features]``."""
    layer_input = _first_tensor(layer_input, layer_name)
    return layer_input.view(-1, layer_input.size(-1)) if layer_input.ndim > 2 else layer_input


def forward_fn_dict(model, inputs):
    """Run ``model`` on a batch that is a dict of keyword arguments."""
    return model(**inputs)


def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(
        f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
        "please provide a custom prepare_layer_inputs_fn"
    )


class LayerInputHook:
    """Base of EVA's hooks: turns a layer's positional inputs into ``[rows, features]`` with
    ``prepare_layer_inputs_fn(layer_input, self.model_input, name)`` (``prepare_layer_inputs_fn_default`` when
    None), gathered from every rank when ``torch.distributed`` is initialised and ``gather_distributed_inputs``."""

    def __init__(self, name: str, prepare_layer_inputs_fn: Callable | None, gather_distributed_inputs: bool):
        self.name = name
        self.prepare_layer_inputs_fn = prepare_layer_inputs_fn or prepare_layer_inputs_fn_default
        self.gather_distributed_inputs = gather_distributed_inputs
        self.model_input = None

    @torch.no_grad()
    def rows(self, layer_input) -> torch.Tensor:
        rows = self.prepare_layer_inputs_fn(layer_input, self.model_input, self.name)
        if not (dist.is_initialized() and self.gather_distributed_inputs):
            return rows
        sizes = torch.empty(dist.get_world_size(), dtype=torch.long, device=rows.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([rows.shape[0]], device=rows.device))
        sizes = sizes.tolist()
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        gathered = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([tensor[:size] for tensor, size in zip(gathered, sizes)], dim=0)


class InputFingerprint(LayerInputHook):
    """Forward hook: ``fingerprint`` is a digest of the values of the layer's first input (None until run).

    Equal values give equal digests (``-0.0`` counts as ``0.0``, as with peft's hash of the values)."""

    fingerprint: str | None = None

    @torch.no_grad()
    def __call__(self, module, layer_input, output) -> None:
        if self.fingerprint is not None:
            return
        rows = self.rows(layer_input).detach().cpu().contiguous() + 0.0  # + 0.0 turns -0.0 into 0.0
        digest = hashlib.sha256(str((rows.dtype, tuple(rows.shape))).encode())
        digest.update(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
        self.fingerprint = digest.hexdigest()


class InputSvd(LayerInputHook):
    """Forward hook: folds the layer's input rows (as float32) into an ``IncrementalPCA`` of ``n_components``;
    ``converged[i]`` says whether component ``i`` moved less than ``tau`` (cosine similarity) in the last step.
    A batch with fewer rows than ``n_components`` is skipped, with a message, as peft does."""

    def __init__(self, n_components: int, tau: float, **hook_settings) -> None:
        super().__init__(**hook_settings)
        self.n_components = n_components
        self.tau = tau
        self.svd = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, layer_input, output) -> None:
        previous = self.svd.components_.clone() if self.svd.fitted else None
        rows = self.rows(layer_input)
        if rows.size(0) < self.n_components:
            print(f"skipping SVD for {self.name} because there are less than {self.n_components} examples")
            return
        self.svd.partial_fit(rows.to(torch.float32))
        if previous is None:
            return
        components = self.svd.components_
        if components.ndim == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.tau


def per_layer_functions(
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None, layer_names: list[str]
) -> dict[str, Callable | None]:
    """The ``prepare_layer_inputs_fn`` of each of ``layer_names``: the one function, or a mapping's entry (None,
    i.e. the default, for a layer the mapping leaves out). ``ValueError`` naming the mapping's keys that name
    no layer. The caller's mapping is not mutated."""
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        return dict.fromkeys(layer_names, prepare_layer_inputs_fn)
    unknown = [name for name in prepare_layer_inputs_fn if name not in layer_names]
    if unknown:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{unknown}; the layers EVA initialises are {layer_names}"
        )
    return {name: prepare_layer_inputs_fn.get(name) for name in layer_names}
