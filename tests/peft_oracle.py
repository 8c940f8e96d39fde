"""peft 0.21.2 as the oracle: build the same adapter in peft and in lora_engine, and compare what each does.

The scaffold that tests of a layer kind share, so that each test reads as the behaviour it checks:

- ``build_pair(make_base, config, prepare_theirs)``: a peft model and ours on identical bases (``make_base()``
  twice, deterministic), the same ``LoraConfig`` (``init_lora_weights=False`` by default, so the adapter is not a
  no-op), then peft's adapter copied into ours through peft's saved state dict, which holds peft's keys whatever
  names each library uses in memory. ``prepare_theirs(theirs)`` runs on peft's model first (to set random
  token rows, or to zero a factor).
- ``add_adapter_to_pair``: a second adapter, built and copied the same way.
- ``trainable_names_in_peft`` / ``assert_loss_and_gradients_match``: our parameters under peft's names (each test
  module says how its in-memory names differ from peft's), and one training step's loss and LoRA gradients.
- ``saved_files`` / ``reload_in``: both models' ``adapter_model.safetensors``, and an adapter saved by one library
  loaded into a fresh base by the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import peft
import torch
from safetensors.torch import load_file

import lora_engine

TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}


def _same_name(name: str) -> str:
    return name


def build_pair(make_base: Callable, config: dict, prepare_theirs: Callable | None = None):
    """``(peft model, our model)`` holding the same adapter ``"default"``; see the module docstring."""
    config = {"init_lora_weights": False, **config}
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**copy.deepcopy(config)))
    ours = lora_engine.get_peft_model(make_base(), lora_engine.LoraConfig(**copy.deepcopy(config)))
    if prepare_theirs is not None:
        prepare_theirs(theirs)
    lora_engine.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def add_adapter_to_pair(theirs, ours, adapter_name: str, config: dict, prepare_theirs=None) -> None:
    """Add ``adapter_name`` with ``config`` to both models, ours holding peft's tensors."""
    config = {"init_lora_weights": False, **config}
    theirs.add_adapter(adapter_name, peft.LoraConfig(**copy.deepcopy(config)))
    ours.add_adapter(adapter_name, lora_engine.LoraConfig(**copy.deepcopy(config)))
    if prepare_theirs is not None:
        prepare_theirs(theirs)
    their_state = peft.get_peft_model_state_dict(theirs, adapter_name=adapter_name)
    lora_engine.set_peft_model_state_dict(ours, their_state, adapter_name)


def trainable_names_in_peft(model, our_name_in_peft: Callable[[str], str] = _same_name) -> set[str]:
    """The names of ``model``'s trainable parameters, translated to peft's in-memory names."""
    return {our_name_in_peft(name) for name, param in model.named_parameters() if param.requires_grad}


def assert_loss_and_gradients_match(
    theirs,
    ours,
    loss_of: Callable,
    our_name_in_peft: Callable[[str], str] = _same_name,
    may_be_zero: Callable[[str], bool] = lambda name: False,
) -> None:
    """One training-mode ``loss_of(model)`` in each library: equal losses, the same trainable parameters under
    peft's names, each with a gradient equal to peft's and non-zero unless ``may_be_zero(peft name)``."""
    losses = []
    for model in (theirs, ours):
        model.train()
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOLERANCE)
    their_grads = {name: p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {our_name_in_peft(name): p.grad for name, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        assert grad is not None and (grad.abs().sum() > 0 or may_be_zero(name)), name
        torch.testing.assert_close(grad, their_grads[name], **TOLERANCE, msg=name)


def saved_files(theirs, ours, folder) -> tuple[dict, dict]:
    """``(peft's, ours)`` ``adapter_model.safetensors`` tensors, each model saved under ``folder``."""
    theirs.save_pretrained(folder / "theirs")
    ours.save_pretrained(folder / "ours")
    return (
        load_file(folder / "theirs" / "adapter_model.safetensors"),
        load_file(folder / "ours" / "adapter_model.safetensors"),
    )


def assert_same_tensors(ours: dict, theirs: dict, **tolerance) -> None:
    """Equal key sets and values (exactly, unless a tolerance is given)."""
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], **(tolerance or {"atol": 0, "rtol": 0}), msg=key)


def reload_in(library, saved_model, make_base: Callable, folder):
    """``saved_model`` saved under ``folder`` and loaded onto ``make_base()`` by ``library`` (peft or ours)."""
    saved_model.save_pretrained(folder)
    return library.PeftModel.from_pretrained(make_base(), folder)
