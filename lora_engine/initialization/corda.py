"""``preprocess_corda``: the data pass of CorDA (peft 0.21's ``init_lora_weights="corda"``), run on the base model
before ``get_peft_model``.

For each targeted ``nn.Linear``/``Conv1D`` it collects the input covariance ``C`` while ``run_model()`` runs,
damps it until it inverts well, takes the SVD ``U S Vhᵀ`` of ``W C`` and keeps ``U``, ``S`` and ``V = (Vh C⁻¹)ᵀ``
cropped to the layer's rank: the largest components for ``"ipm"``, the smallest for ``"kpm"``. The result is left
on the layer as ``layer.eigens`` (a ``CordaEigens``), which the LoRA layer reads and deletes at injection
(``layers/corda_init.py``). The arithmetic is peft's step for step.

Files (``CordaConfig.cache_file``, ``covariance_file``): written as safetensors, never pickled; peft writes them
with ``torch.save``, and such a file is read with ``torch.load(weights_only=True)``, which loads tensors only.
peft cannot read the safetensors files lora_engine writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_engine.layers.corda_init import CordaEigens
from lora_engine.serialization import atomic_write
from lora_engine.targeting import is_targeted, rank_and_alpha

#: Attributes preprocessing leaves on a layer; all but ``eigens`` are deleted when ``prune_temporary_fields``.
TEMPORARY_FIELDS = ("sample_count", "covariance_matrix", "corda_method", "rank")
#: The damping starts at this share of the mean diagonal and doubles until ‖C C⁻¹ − I‖ < INVERSE_TOLERANCE.
INITIAL_DAMP = 0.01
INVERSE_TOLERANCE = 0.05


def target_modules(model: nn.Module, config) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for each ``nn.Linear``/``Conv1D`` of ``model`` that ``config.target_modules`` names."""
    if config.target_modules is None:
        raise ValueError("preprocess_corda needs lora_config.target_modules (the layers CorDA initialises)")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and is_targeted(name, config):
            yield name, module


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Leave ``eigens`` on every layer of ``model`` that ``lora_config`` targets (``model`` is mutated; its
    weights are not).

    ``run_model()`` runs the calibration data through ``hooked_model`` (default ``model``; another model's
    statistics are matched to ``model``'s layers by name). A call of a layer counts as one sample: its input,
    all leading dimensions flattened, divided by its maximum, adds ``xᵀx`` to the covariance. With
    ``corda_config.cache_file`` pointing at a non-empty file, the eigens are read from it and nothing runs;
    with ``covariance_file`` non-empty, the covariances are read from it. Either file is written when given
    and missing. ``ValueError`` when neither file exists and ``run_model`` is None, when a targeted layer saw
    no input, or for non-finite inputs.
    """
    corda_config = lora_config.corda_config
    if corda_config is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig)")
    cache_file = corda_config.cache_file
    if _exists(cache_file):
        cache = _read_tensors(cache_file, _device_of(model))
        for name, module in target_modules(model, lora_config):
            module.eigens = CordaEigens(
                *(_cache_entry(cache, cache_file, f"{name}.eigens.{key}_WC") for key in "SUV")
            )
        return
    if corda_config.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    for name, module in target_modules(model, lora_config):
        module.corda_method = corda_config.corda_method
        module.rank = rank_and_alpha(name, lora_config)[0]
    _collect_covariances(model, lora_config, run_model, hooked_model)
    layers = list(target_modules(model, lora_config))
    if corda_config.verbose:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Collecting eigens")
    for name, module in layers:
        module.eigens = _cropped(_eigens_of(name, module), module, _device_of(model))
    if corda_config.prune_temporary_fields:
        for _, module in target_modules(model, lora_config):
            for field in TEMPORARY_FIELDS:
                if hasattr(module, field):
                    delattr(module, field)
    if cache_file is not None:
        cache = {}
        for name, module in target_modules(model, lora_config):
            for key, tensor in zip("SUV", (module.eigens.S_WC, module.eigens.U_WC, module.eigens.V_WC)):
                cache[f"{name}.eigens.{key}_WC"] = tensor
        _write_tensors(cache_file, cache)


def _collect_covariances(model, config, run_model, hooked_model) -> None:
    covariance_file = config.corda_config.covariance_file
    if _exists(covariance_file):
        covariances = _read_tensors(covariance_file, _device_of(model))
        for name, module in target_modules(model, config):
            module.covariance_matrix = _cache_entry(covariances, covariance_file, name)
        return
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked_model = model if hooked_model is None else hooked_model
    hooked_model.eval()
    keep_input_dtype = config.corda_config.use_float16_for_covariance

    def add_covariance(module, layer_input, output) -> None:
        rows = layer_input[0].detach()
        rows = rows.reshape(-1, rows.shape[-1])
        if not keep_input_dtype:
            rows = rows.float()
        rows = rows / torch.max(rows).abs()
        if not torch.isfinite(rows).all():
            raise ValueError("Invalid value found in input, please check your input data.")
        covariance = rows.t().matmul(rows)
        if not torch.isfinite(covariance).all():
            raise ValueError("Invalid value found in covariance (NaN or infinity).")
        module.sample_count += 1
        module.covariance_matrix += covariance

    handles = []
    for _, module in target_modules(hooked_model, config):
        module.sample_count = 0
        module.covariance_matrix = 0
        handles.append(module.register_forward_hook(add_covariance))
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    if hooked_model is not model:
        hooked = dict(target_modules(hooked_model, config))
        for name, module in target_modules(model, config):
            if name in hooked:  # a layer only the hooked model runs is left out, as in peft
                module.sample_count = hooked[name].sample_count
                module.covariance_matrix = hooked[name].covariance_matrix
    covariances = {}
    for name, module in target_modules(model, config):
        if getattr(module, "sample_count", 0) == 0:
            raise ValueError(
                f"layer {name!r} saw no input while run_model() ran, so CorDA has no covariance for it; run data "
                "through every targeted layer, or leave it out of target_modules"
            )
        module.covariance_matrix /= module.sample_count
        covariances[name] = module.covariance_matrix
    if covariance_file is not None:
        _write_tensors(covariance_file, covariances)


def _eigens_of(name: str, linear: nn.Module) -> CordaEigens:
    """The full decomposition of one layer (``U``, ``V`` on the CPU, as peft keeps them)."""
    weight = linear.weight.data.float()
    if isinstance(linear, Conv1D):
        weight = weight.T
    if not hasattr(linear, "covariance_matrix"):
        raise ValueError(f"layer {name!r} has no covariance matrix; call preprocess_corda, not this function")
    covariance = linear.covariance_matrix.float()
    size = covariance.size(0)
    damp = INITIAL_DAMP
    while True:
        compensate = torch.diag(
            torch.ones(size).to(covariance.device) * torch.mean(torch.diag(covariance)) * damp
        )
        damped = covariance + compensate
        inverse = torch.linalg.inv(damped)
        inverse_error = torch.dist(damped @ inverse, torch.eye(size).to(_device_of(linear))).item()
        if inverse_error < INVERSE_TOLERANCE:
            break
        damp = damp * 2
    left, singular, right_h = torch.linalg.svd(weight @ damped, full_matrices=False)
    right = (right_h @ inverse).transpose(0, 1)
    return CordaEigens(S_WC=singular, U_WC=left.cpu(), V_WC=right.cpu())


def _cropped(eigens: CordaEigens, module: nn.Module, device: torch.device) -> CordaEigens:
    """The ``module.rank`` largest (``"ipm"``) or smallest (``"kpm"``) components, copied (so that a saved cache
    holds only them), ``U`` and ``V`` on ``device``."""
    if module.corda_method not in ("ipm", "kpm"):
        raise ValueError(f"Invalid corda_method found: {module.corda_method}, it should be 'ipm' or 'kpm'.")
    rank = module.rank
    keep = slice(None, rank) if module.corda_method == "ipm" else slice(-rank, None)
    if rank > eigens.S_WC.size(0):
        raise ValueError(
            f"rank {rank} is larger than the layer's smallest dimension {eigens.S_WC.size(0)}; lower r or rank_pattern"
        )
    return CordaEigens(
        S_WC=eigens.S_WC[keep].clone(),
        U_WC=eigens.U_WC[:, keep].clone().to(device),
        V_WC=eigens.V_WC[:, keep].clone().to(device),
    )


def _device_of(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)  # DeepSpeed / DataParallel
    return next(iter(model.parameters())).device


def _exists(path) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _cache_entry(tensors: dict[str, torch.Tensor], path, key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(
            f"{os.fspath(path)!r} has no tensor {key!r}; it was built for another model or other target_modules "
            "(delete it to rebuild it)"
        )
    return tensors[key]


def _read_tensors(path, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a ``torch.save`` file of a dict of tensors (peft's format),
    loaded with ``weights_only=True``: no object other than tensors and containers is ever unpickled."""
    path = os.fspath(path)
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError):
        pass
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path!r} is neither a safetensors file nor a torch.save file of tensors: {error}"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(value, torch.Tensor) for value in tensors.values()
    ):
        raise ValueError(f"{path!r} does not hold a dict of tensors")
    return tensors


def _write_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically, creating its folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    contiguous = {key: tensor.detach().contiguous() for key, tensor in tensors.items()}
    atomic_write(path, lambda temporary: save_file(contiguous, temporary))
