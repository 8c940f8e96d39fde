"""peft's adapter folder format: file names and the saved-key prefix, with no imports.

A leaf module: the command line reads these names without importing torch, and the library writes and reads
the same files with them, so an adapter folder means the same thing to both libraries.
"""

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
# Read only, through ``torch.load(weights_only=True)``; never written.
BIN_NAME = "adapter_model.bin"
# A PeftModel's state-dict keys, and so every saved key, start with this: ``PeftModel.base_model`` is the
# ``LoraModel`` and ``LoraModel.model`` the wrapped transformers model.
SAVED_PREFIX = "base_model.model."
# The peft release whose adapter_config.json format we write, stored as ``peft_version``. peft reads the key back
# only to fill the field (its LoRA config never compares it), so files naming 0.21.2 load in peft 0.21.2 without
# a warning.
PEFT_FORMAT_VERSION = "0.21.2"
# peft's name for "no adapter" in a mixed batch's ``adapter_names`` (``layers/routing.BASE_ONLY`` routes it), so
# no adapter may be called this.
BASE_ONLY_NAME = "__base__"
