"""Initializations of LoRA factors that need more than a layer's weight: LoftQ (quantization-aware), EVA and CorDA
(a data pass), with their sub-configs (``loftq_config``, ``data_driven_init_configs``). The per-layer math they
install lives in ``layers/`` (``loftq``, ``corda_init``); the inits that only set factors live in ``layers/inits``."""
