"""Which modules of a model get LoRA adapters, and with which rank and alpha.

The rules are peft 0.21.2's, so that one `adapter_config.json` selects the same modules in both libraries.
A config is read through these attributes only: `target_modules`, `exclude_modules`, `layers_to_transform`,
`layers_pattern`, `rank_pattern`, `alpha_pattern`, `r`, `lora_alpha`, `modules_to_save`, `task_type`.
The one thing written is `config.target_modules`, by `find_targets`, as peft does before it saves the config.
"""

import re
import warnings

import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lora_engine.errors import NoMatchingPeftModuleError
from lora_engine.module_tree import named_modules_outside_adapters, wrapped_module

# peft rewrites a target list this long into the shortest name suffixes that select the same modules, and that
# shorter form is what it saves in adapter_config.json.
_MIN_TARGETS_TO_SHORTEN = 20

_LINEAR_KINDS = (torch.nn.Linear, Conv1D)

# The default `target_modules` per `model.config.model_type`: peft's table (less gemma4, whose default is a regex),
# plus phi3, distilbert and smollm3, which peft lacks.
_DEFAULT_TARGET_MODULES = {
    "bart": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "chatglm": ("query_key_value",),
    "codegen": ("qkv_proj",),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "electra": ("query", "value"),
    "falcon": ("query_key_value",),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neo": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "mpt": ("Wqkv",),
    "mt5": ("q", "v"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "opt": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "RefinedWeb": ("query_key_value",),
    "RefinedWebModel": ("query_key_value",),
    "roberta": ("query", "value"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    "smollm3": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "xlm-roberta": ("query", "value"),
}


def is_targeted(module_name: str, config) -> bool:
    """Whether the module called `module_name` gets an adapter under `config`, by name alone.

    `exclude_modules` wins: a str is a regex `fullmatch`, a list takes exact names and `.`-bounded suffixes. Then a
    str `target_modules` is a regex `fullmatch` on the full name; a list takes an exact name as is, and a
    `.`-bounded suffix only in a layer that `layers_to_transform` selects (see `_layer_index`). `target_modules`
    must already be resolved (not None, not "all-linear" unless that is meant as a regex).
    Raises ValueError for the layer options peft's LoraConfig rejects: `layers_to_transform` or `layers_pattern`
    with a str `target_modules`, and `layers_pattern` without `layers_to_transform`.
    """
    _check_layer_options(config)
    return not _is_excluded(module_name, config.exclude_modules) and _matches_targets(module_name, config)


def default_target_modules(model_type: str) -> list[str]:
    """The modules targeted when `target_modules` is None; ValueError for a model type without a default."""
    if model_type not in _DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"There is no default target_modules for model type {model_type!r}: target_modules must be given, "
            'e.g. ["q_proj", "v_proj"] or "all-linear".'
        )
    return list(_DEFAULT_TARGET_MODULES[model_type])


def all_linear_targets(model: torch.nn.Module, task_type=None) -> set[str]:
    """Full names of every `nn.Linear` and transformers `Conv1D` in `model`, as peft resolves "all-linear".

    Left out, for a `PreTrainedModel` only: the output embedding, or, when there is none and `task_type` is
    "SEQ_CLS", the first of `model.score` / `model.classifier` that exists. A wrapper already in the model (an
    adapter layer holding `base_layer`, a modules-to-save wrapper holding `original_module`) stands for the module
    it holds: it is taken when that module is linear, and nothing inside it is taken. So the result is the same
    before and after modules are wrapped, and a second adapter can target the wrappers of the first.
    """
    named_modules = list(named_modules_outside_adapters(model))
    wrappers = [name for name, module in named_modules if wrapped_module(module) is not None]
    head = _output_head(model, task_type)
    return {
        name
        for name, module in named_modules
        if (isinstance(module, _LINEAR_KINDS) or isinstance(wrapped_module(module), _LINEAR_KINDS))
        and module is not head
        and not _is_inside(name, wrappers)
    }


def rank_and_alpha(module_name: str, config) -> tuple[int, float]:
    """The rank and alpha of `module_name`'s adapter.

    Each comes from the first key, in dict order, of `config.rank_pattern` (resp. `alpha_pattern`) that matches
    `(.*\\.)?(key)$` from the start of the name; rank and alpha are looked up independently, and fall back to
    `config.r` and `config.lora_alpha`.
    """
    rank = _pattern_value(config.rank_pattern, module_name, config.r)
    alpha = _pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return rank, float(alpha)


def is_module_to_save(module_name: str, modules_to_save) -> bool:
    """Whether peft wraps `module_name` as a module to save: its name ends with an entry, with no `.` boundary
    (so "norm" takes "input_layernorm" too)."""
    return any(module_name.endswith(entry) for entry in modules_to_save or ())


def find_targets(model: torch.nn.Module, config, skip_within=()) -> list[str]:
    """Full names of the modules of `model` to wrap with an adapter, in `named_modules()` order.

    `config.target_modules` None takes the default for `model.config.model_type`; "all-linear" (any case) takes
    `all_linear_targets`; a resolved list of 20 or more names is shortened to the name suffixes that select the
    same modules. The result is written to `config.target_modules`, as peft does.
    Never returned: the root module, anything strictly inside a module named in `skip_within` (existing adapter
    wrappers, which may themselves be targeted again), a module to save or anything inside one (peft's rule, see
    `_is_in_modules_to_save`). Module types are not checked.
    Raises ValueError when nothing is targeted, naming why. Warns (RuntimeWarning) for list entries that name no
    module, `exclude_modules` that exclude nothing, and rank/alpha pattern keys that match no target.
    """
    requested = config.target_modules
    all_names = [name for name, _ in named_modules_outside_adapters(model)]
    resolved = _resolve_targets(model, config)
    config.target_modules = _shortened(resolved, all_names)
    candidates = [name for name in all_names if name and not _is_inside(name, skip_within)]
    targets = [
        name
        for name in candidates
        if is_targeted(name, config) and not _is_in_modules_to_save(name, config.modules_to_save)
    ]
    unnamed = [] if isinstance(resolved, str) else _entries_naming_nothing(resolved, candidates)
    if not targets:
        raise NoMatchingPeftModuleError(_no_target_message(requested, resolved, unnamed, candidates, config))
    if unnamed:
        warnings.warn(
            f"target_modules entries {unnamed} name no module of the model; only the other entries were used.",
            RuntimeWarning,
            stacklevel=2,
        )
    if config.exclude_modules and not any(_is_excluded(name, config.exclude_modules) for name in candidates):
        warnings.warn(
            f"exclude_modules={config.exclude_modules!r} excluded no module; check its spelling.",
            RuntimeWarning,
            stacklevel=2,
        )
    for attribute in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attribute) or {}
        unused = [key for key in patterns if not any(_key_matches(key, name) for name in targets)]
        if unused:
            warnings.warn(
                f"{attribute} keys {unused} match no targeted module and are ignored.",
                RuntimeWarning,
                stacklevel=2,
            )
    return targets


def _check_layer_options(config) -> None:
    if isinstance(config.target_modules, str) and (
        config.layers_to_transform is not None or config.layers_pattern is not None
    ):
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} and layers_pattern={config.layers_pattern!r} "
            f"need a list target_modules, not the regex {config.target_modules!r}; put the layer into the regex."
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(
            f"layers_pattern={config.layers_pattern!r} is set without layers_to_transform; give the layer indices."
        )


def _names_match(module_name: str, names) -> bool:
    """Exact name, or a suffix of it that starts after a `.`: set lookups of the name's few suffixes, so the
    cost does not grow with the number of names (a file may list tens of thousands)."""
    names = names if isinstance(names, set | frozenset) else set(names)
    return module_name in names or any(suffix in names for suffix in _suffixes(module_name)[:-1])


def _is_excluded(module_name: str, exclude_modules) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, module_name) is not None
    return _names_match(module_name, exclude_modules)


def _matches_targets(module_name: str, config) -> bool:
    """`target_modules` and the layer selection, ignoring exclusions."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    if module_name in targets:  # an exact full name is taken whatever layers_to_transform says
        return True
    if not _names_match(module_name, targets):
        return False
    return _in_selected_layer(module_name, config)


def _in_selected_layer(module_name: str, config) -> bool:
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(module_name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(module_name: str, layers_pattern) -> int | None:
    """The layer number in `module_name`: the first all-digit segment after a segment matching one of
    `layers_pattern` (regexes, tried in order), or, with no pattern, the first all-digit segment that has at least
    two segments before it and one after it ("model.layers.3.mlp" -> 3; a later MoE expert index is ignored)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<index>\d+)\.", module_name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        matches = (re.match(rf"(?:^|.*?\.){pattern}\.(?P<index>\d+)\.", module_name) for pattern in patterns)
        match = next((match for match in matches if match), None)
    return int(match["index"]) if match else None


def _is_in_modules_to_save(module_name: str, modules_to_save) -> bool:
    """peft's guard against adapters on modules to save: an entry (a regex) spans whole segments of the name, so
    the module to save itself and everything inside it are never targeted."""
    return any(re.match(rf"(^|.*\.){entry}($|\..*)", module_name) for entry in modules_to_save or ())


def _is_inside(module_name: str, parents) -> bool:
    return any(module_name.startswith(parent + ".") for parent in parents)


def _output_head(model: torch.nn.Module, task_type) -> torch.nn.Module | None:
    """The module "all-linear" leaves out: peft only looks for one in a transformers model."""
    if not isinstance(model, PreTrainedModel):
        return None
    head = model.get_output_embeddings()
    if head is None and task_type == "SEQ_CLS":
        heads = (getattr(model, name, None) for name in ("score", "classifier"))
        head = next((module for module in heads if module is not None), None)
    return head


def _resolve_targets(model: torch.nn.Module, config):
    targets = config.target_modules
    if targets is None:
        return set(default_target_modules(getattr(getattr(model, "config", None), "model_type", None)))
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return all_linear_targets(model, config.task_type)
    return targets


def _shortened(targets, all_names: list[str]):
    """`targets`, or, for a list of 20 or more names, the fewer name suffixes peft would save instead.

    Targets are visited in order of their suffix lists (shortest suffix first); each not yet covered by a kept
    suffix keeps its shortest suffix that is no suffix of a module the list does not select.
    """
    if isinstance(targets, str) or len(targets) < _MIN_TARGETS_TO_SHORTEN:
        return targets
    taken = {suffix for name in all_names if not _names_match(name, targets) for suffix in _suffixes(name)}
    kept = set()
    for target in sorted(targets, key=_suffixes):
        if any(suffix in kept for suffix in _suffixes(target)[:-1]):
            continue
        free = next((suffix for suffix in _suffixes(target) if suffix not in taken), None)
        if free is not None:
            kept.add(free)
    return kept if kept and len(kept) < len(targets) else targets


def _suffixes(module_name: str) -> list[str]:
    """`.`-bounded suffixes, shortest first: "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    segments = module_name.split(".")
    return [".".join(segments[start:]) for start in reversed(range(len(segments)))]


def _entries_naming_nothing(targets, names: list[str]) -> list[str]:
    named = {suffix for name in names for suffix in _suffixes(name)}
    return sorted(entry for entry in targets if entry not in named)


def _no_target_message(requested, resolved, unnamed, candidates, config) -> str:
    message = f"No module of the model is targeted by target_modules={requested!r}"
    if resolved is not requested:
        message += f" (resolved to {sorted(resolved)})"
    reasons = []
    if isinstance(resolved, str):
        reasons.append('a str target_modules is a regex for the whole module name, e.g. ".*q_proj"')
    if unnamed:
        reasons.append(f"entries {unnamed} name no module")
    matched = [name for name in candidates if _matches_targets(name, config)]
    removers = [
        f"{attribute}={value!r}"
        for attribute, value, is_removed in (
            ("exclude_modules", config.exclude_modules, _is_excluded),
            ("modules_to_save", config.modules_to_save, _is_in_modules_to_save),
        )
        if any(is_removed(name, value) for name in matched)
    ]
    if removers:
        reasons.append(f"{' and '.join(removers)} removed every module it matched ({matched})")
    elif (
        not isinstance(resolved, str)
        and len(unnamed) < len(resolved)
        and config.layers_to_transform is not None
    ):
        reasons.append(
            f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) "
            "selected no layer of the modules it names"
        )
    return message + "".join(f"; {reason}" for reason in reasons) + "."


def _key_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_value(patterns, module_name: str, default):
    return next((value for key, value in (patterns or {}).items() if _key_matches(key, module_name)), default)


def find_target_parameters(
    model: torch.nn.Module, target_parameters: list[str], wrapper_names: dict[str, torch.nn.Module]
) -> dict[str, list[str]]:
    """peft's ``target_parameters`` matching: ``{module name: [parameter names]}`` for every parameter registered
    directly on a module whose full name equals an entry or ends with ``"." + entry``, in ``named_modules()``
    order, each module's parameters in registration order (peft's nesting order).

    ``wrapper_names`` maps the names of existing adapter wrappers to their base layers: a wrapper's base layer is
    matched under the wrapper's name, and nothing inside a wrapper is matched on its own. Raises ``TypeError`` for a
    str (peft does not take a regex here).
    """
    if isinstance(target_parameters, str):
        raise TypeError(
            f"target_parameters={target_parameters!r} is a str; it must be a list of parameter names such as "
            '["experts.gate_up_proj"] (not a regex)'
        )
    found: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        if not module_name or _is_inside(module_name, list(wrapper_names)):
            continue
        holder = wrapper_names.get(module_name, module)
        for parameter_name, _ in holder.named_parameters(recurse=False):
            key = f"{module_name}.{parameter_name}"
            if any(key == entry or key.endswith(f".{entry}") for entry in target_parameters):
                found.setdefault(module_name, []).append(parameter_name)
    return found
