"""Walking and editing a model's module tree: replacing a submodule by its dotted name (the one way ``LoraModel``
and the dense export mutate a model), and a walk that skips what adapter wrappers hold per adapter."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def replace_submodule(model: nn.Module, module_name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` at ``module_name`` (``"model.layers.0.self_attn.q_proj"``) inside ``model``, in place.

    ``AttributeError`` if the parent of ``module_name`` does not exist.
    """
    parent_name, _, child_name = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def named_modules_outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (pre-order, each module once) without what adapter wrappers hold per adapter.

    A wrapper (a module holding ``base_layer`` or ``original_module``) is yielded and then only the module it
    wraps is walked, not its per-adapter factors or copies: the walk costs the same however many adapters are
    loaded, so adding, loading and saving an adapter stays flat in that number.
    """
    seen = set()
    pending = [("", model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        held = wrapped_module(module)
        if held is None:
            children = list(module.named_children())
        else:
            children = [
                ("base_layer" if getattr(module, "base_layer", None) is held else "original_module", held)
            ]
        pending.extend((f"{name}.{child}" if name else child, sub) for child, sub in reversed(children))


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, by peft's attribute names; None for a module that wraps nothing."""
    for attribute in ("base_layer", "original_module"):
        held = getattr(module, attribute, None)
        if isinstance(held, nn.Module):
            return held
    return None
