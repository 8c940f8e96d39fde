"""Adapters on what is not a whole module: ``target_parameters`` (LoRA on ``nn.Parameter``s, e.g. stacked MoE
experts) and ``trainable_token_indices`` (trained embedding rows). ``LoraModel.inject_adapter`` calls these after
the module targets, with its list ``created`` of new wrappers so that a failure rolls everything back.
"""

from __future__ import annotations

from torch import nn

from lora_engine.config import LoraConfig
from lora_engine.layers.base import LoraLayer
from lora_engine.layers.parameters import LoraParameters
from lora_engine.layers.trainable_tokens import inject_trainable_tokens
from lora_engine.module_tree import replace_submodule
from lora_engine.targeting import find_target_parameters, rank_and_alpha


def wrapped_bases(lora_model) -> dict[str, nn.Module]:
    """``{name: base layer}`` of the LoRA wrappers already in ``lora_model`` (an object with
    ``named_adapter_wrappers``), so a parameter of a wrapped module is matched under the module's own name."""
    wrappers = lora_model.named_adapter_wrappers()
    return {name: wrapper.base_layer for name, wrapper in wrappers if isinstance(wrapper, LoraLayer)}


def add_parameter_loras(
    model: nn.Module, adapter_name: str, config: LoraConfig, bases: dict[str, nn.Module], created: list
) -> None:
    """``target_parameters``: one ``LoraParameters`` per module holding targeted parameters (peft's matching and
    rules). ``ValueError`` naming the option, module or entries that do not fit; ``TypeError`` for a str."""
    for option in ("lora_dropout", "fan_in_fan_out", "use_dora", "lora_bias"):
        if getattr(config, option, None):
            raise ValueError(
                f"target_parameters with {option}={getattr(config, option)!r}: LoRA on parameters does not "
                f"work with {option} (as in peft); leave it at its default"
            )
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        raise ValueError(
            f"target_parameters with init_lora_weights={init!r} is not supported yet by lora_engine; use True, "
            "False or 'gaussian'"
        )
    found = find_target_parameters(model, config.target_parameters, bases)
    if not found:
        raise ValueError(
            f"target_parameters={config.target_parameters} matched no parameter of the model; entries are full "
            'parameter names or their "."-bounded suffixes, e.g. "experts.gate_up_proj"'
        )
    for module_name, parameter_names in found.items():
        module = model.get_submodule(module_name)
        LoraParameters.check_can_hold(module_name, module, parameter_names)
        settings = {rank_and_alpha(f"{module_name}.{name}", config) for name in parameter_names}
        if len(settings) > 1:
            raise ValueError(
                f"target_parameters: the parameters {parameter_names} of {module_name!r} get different (r, "
                f"lora_alpha) {sorted(settings)} from rank_pattern/alpha_pattern; that is not supported yet"
            )
        if not isinstance(module, LoraParameters):
            module = LoraParameters(module_name, module, parameter_names)
            replace_submodule(model, module_name, module)
            created.append((module_name, module))
        ((r, lora_alpha),) = settings
        module.add_adapter(adapter_name, r, lora_alpha, 0.0, config.use_rslora, config.init_lora_weights)


def add_trainable_tokens(model: nn.Module, adapter_name: str, config: LoraConfig, created: list) -> None:
    """``trainable_token_indices``: see ``layers.trainable_tokens``. ``ValueError`` when a module is also in
    ``modules_to_save`` (peft's rule)."""
    indices = config.trainable_token_indices
    named = indices if isinstance(indices, dict) else {}
    both = [name for name in named if config.modules_to_save and name in config.modules_to_save]
    if both:
        raise ValueError(
            f"{both[0]!r} is in modules_to_save (trained fully) and in trainable_token_indices; pass it in one "
            "of them only"
        )
    inject_trainable_tokens(model, adapter_name, indices, created)
