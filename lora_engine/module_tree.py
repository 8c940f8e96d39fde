"""Replacing a submodule by its dotted name: the one way ``LoraModel`` and the dense export mutate a model."""

from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, module_name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` at ``module_name`` (``"model.layers.0.self_attn.q_proj"``) inside ``model``, in place.

    ``AttributeError`` if the parent of ``module_name`` does not exist.
    """
    parent_name, _, child_name = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)
