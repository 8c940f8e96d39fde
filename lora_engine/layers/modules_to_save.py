"""``modules_to_save``: a fully trained copy of a module per adapter (a classifier head, an ``lm_head``).

The wrapper keeps the frozen ``original_module`` and, per adapter, a trainable deep copy in
``modules_to_save[adapter]``. The forward uses the active adapter's copy, or the original when adapters are
disabled or none of this wrapper's copies is active. At most one of its copies can be active.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lora_engine.layers.routing import AdapterRouting
from lora_engine.state_tensors import state_tensors


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` plus one trainable copy per adapter in ``modules_to_save``."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.routing: AdapterRouting | None = None  # set by LoraModel for the length of a mixed-batch forward
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name`` (frozen until activated)."""
        module_copy = copy.deepcopy(self.original_module)
        module_copy.requires_grad_(False)
        self.modules_to_save[adapter_name] = module_copy
        self.original_module.requires_grad_(False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate the copy of the one adapter among ``adapter_names`` that this wrapper holds."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        mine = [name for name in names if name in self.modules_to_save]
        if len(mine) > 1:
            raise ValueError(
                f"modules_to_save can have only one active adapter, but {mine} were asked to be active"
            )
        # Only the active copy is ever trainable: touch the previous and the new one only.
        for name in dict.fromkeys([self.active_adapter, *mine]):
            if name is not None:
                self.modules_to_save[name].requires_grad_(name in mine and not inference_mode)
        self.active_adapter = mine[0] if mine else None

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter([self.active_adapter] if self.active_adapter else [])
        else:
            for module in self.modules_to_save.values():
                module.requires_grad_(False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return (
            list(self.modules_to_save[adapter_name].parameters())
            if adapter_name in self.modules_to_save
            else []
        )

    def adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        """The copy ``adapter_name`` holds, if any."""
        return [self.modules_to_save[adapter_name]] if adapter_name in self.modules_to_save else []

    def wrapped_module(self) -> nn.Module:
        return self.original_module

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """Saved key suffix → in-memory key suffix: peft saves the copy under the original module's keys."""
        if adapter_name not in self.modules_to_save:
            return {}
        copy_keys = state_tensors(self.modules_to_save[adapter_name])
        return {key: f"modules_to_save.{adapter_name}.{key}" for key in copy_keys}

    def active_module(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        return self.active_module()(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Rows routed to an adapter with a copy here run that copy; all other rows run the original."""
        self.routing.check_batch(x.shape[0], type(self.original_module).__name__)
        result = self.original_module(x, *args, **kwargs)
        held = [name for name in self.routing.names if name in self.modules_to_save]
        for name, rows in self.routing.rows_by_adapter(held, x.device):
            result = result.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return result

    def __getattr__(self, name: str):
        # Attributes of the wrapped module (``weight``, ``out_features``...) stay readable through the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)
