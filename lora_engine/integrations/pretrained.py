"""``WrappedPreTrainedModel``: how ``PeftModel`` looks like a transformers ``PreTrainedModel`` to the stock
``Trainer`` and to ``generate``.

``PeftModel`` subclasses ``PreTrainedModel`` only so that the Trainer treats it as a model of its own kind (calls
our ``save_pretrained``); it never runs ``PreTrainedModel.__init__``. The attributes the Trainer and ``generate``
read are answered by the wrapped transformers model (``get_base_model()``), which ``PreTrainedModel``'s class
attributes would otherwise shadow.

Trainer checkpoints are peft's: the Trainer sees our ``PeftModel`` as a peft model (``recognition``), so a checkpoint
folder holds the adapter files alone, written all or nothing by ``save_pretrained``, and resuming and best-model
reloading both go through ``load_adapter``, which checks that the pair belongs together. No second copy of the
weights (a ``model.safetensors``, which the Trainer would prefer when resuming) sits beside them unbound to the
pair: a save killed between the two could resume from weights the adapter files do not hold.
"""

from __future__ import annotations

import inspect

from transformers import PreTrainedModel


class _FromWrappedModel:
    """Read an attribute from the wrapped transformers model; ``PreTrainedModel``'s class default would
    otherwise win over ``__getattr__`` forwarding."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return getattr(instance.get_base_model(), self.name)


class WrappedPreTrainedModel(PreTrainedModel):
    """A ``PreTrainedModel`` whose model-level attributes are those of ``self.get_base_model()``.

    Subclasses define ``get_base_model()`` (the wrapped transformers model) and initialise as ``nn.Module``.
    """

    # transformers' marker of a model with adapters: the Trainer then accepts a quantized base
    # (validate_quantization_for_training), and enabling checkpointing makes the inputs require grad.
    _hf_peft_config_loaded = True

    # Attributes the Trainer and generate read, which PreTrainedModel would otherwise answer for itself.
    get_input_embeddings = _FromWrappedModel()
    get_output_embeddings = _FromWrappedModel()
    tie_weights = _FromWrappedModel()
    gradient_checkpointing_enable = _FromWrappedModel()
    gradient_checkpointing_disable = _FromWrappedModel()
    activation_checkpointing_enable = _FromWrappedModel()
    activation_checkpointing_disable = _FromWrappedModel()
    enable_input_require_grads = _FromWrappedModel()
    disable_input_require_grads = _FromWrappedModel()
    is_gradient_checkpointing = _FromWrappedModel()
    supports_gradient_checkpointing = _FromWrappedModel()
    _no_split_modules = _FromWrappedModel()
    main_input_name = _FromWrappedModel()
    can_generate = _FromWrappedModel()
    loss_function = _FromWrappedModel()
    resize_token_embeddings = _FromWrappedModel()
    get_encoder = _FromWrappedModel()
    get_decoder = _FromWrappedModel()
    _keep_in_fp32_modules = _FromWrappedModel()

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the Trainer passes ``num_items_in_batch`` to ``forward`` (and then does not divide the loss by
        the gradient-accumulation steps): decided from the wrapped model, as the Trainer does for peft."""
        base = self.get_base_model()
        if hasattr(base, "accepts_loss_kwargs"):
            return base.accepts_loss_kwargs
        parameters = inspect.signature(base.forward).parameters.values()
        return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)

    def _get_name(self) -> str:
        # The Trainer's label smoothing shifts labels only when this is a causal-LM class name.
        return self.get_base_model()._get_name()

    def __repr__(self) -> str:
        # nn.Module's printout starts with _get_name(); keep this class's name there, as peft does.
        return type(self).__name__ + super().__repr__().removeprefix(self._get_name())
