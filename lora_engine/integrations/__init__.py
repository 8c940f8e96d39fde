"""Touch points with other libraries: ``pretrained`` (a ``PeftModel`` passes for a transformers model) and
``recognition`` (transformers, accelerate and TRL take our ``PeftModel`` for peft's)."""
