"""peft 0.21.2's public names that are not LoRA as lora_engine does it: what importing one of them says.

``from lora_engine import IA3Config`` (or any other name in ``UNSUPPORTED``) raises ``UnsupportedPeftName``, an
``ImportError`` that names the feature and says lora_engine is LoRA only; the package ``__getattr__`` of
``lora_engine``, ``lora_engine.utils`` and ``lora_engine.tuners`` calls ``unsupported_name``. An ``ImportError``
(not an ``AttributeError``) because ``from x import y`` replaces an ``AttributeError`` by its own message.

``PromptLearningConfig`` does exist: libraries test ``isinstance(config, PromptLearningConfig)``, and for every
lora_engine config the answer is simply False.
"""

from __future__ import annotations

from lora_engine.config import PeftConfig

_OTHER_METHOD = "another PEFT method than LoRA ({method}); lora_engine implements LoRA only"
_PROMPT = "prompt learning ({method}); lora_engine implements LoRA only"
_LORA_EXTRA = "a LoRA {method} that lora_engine does not support"

# Families of names, each with the reason their names do not apply.
_FAMILIES = {
    _OTHER_METHOD: {
        "AdaLoRA": ("AdaLoraConfig", "AdaLoraModel"),
        "AdaMSS": ("AdamssConfig", "AdamssModel"),
        "BOFT": ("BOFTConfig", "BOFTModel"),
        "BEFT": ("BeftConfig", "BeftModel"),
        "C3A": ("C3AConfig", "C3AModel"),
        "DEFT": ("DeftConfig", "DeftModel"),
        "DeLoRA": ("DeloraConfig", "DeloraModel"),
        "FourierFT": ("FourierFTConfig", "FourierFTModel"),
        "FRoD": ("FrodConfig", "FrodModel"),
        "GLoRA": ("GloraConfig", "GloraModel"),
        "GraLoRA": ("GraloraConfig", "GraloraModel"),
        "HRA": ("HRAConfig", "HRAModel"),
        "HiRA": ("HiraConfig", "HiraModel"),
        "IA3": ("IA3Config", "IA3Model"),
        "LN tuning": ("LNTuningConfig", "LNTuningModel"),
        "Lily": ("LilyConfig", "LilyModel"),
        "LoHa": ("LoHaConfig", "LoHaModel"),
        "LoKr": ("LoKrConfig", "LoKrModel"),
        "MiSS": ("MissConfig", "MissModel"),
        "OFT": ("OFTConfig", "OFTModel"),
        "OSF": ("OSFConfig", "OSFModel"),
        "PEANuT": ("PeanutConfig", "PeanutModel"),
        "Poly": ("PolyConfig", "PolyModel"),
        "PSOFT": ("PsoftConfig", "PsoftModel"),
        "PVeRA": ("PveraConfig", "PveraModel"),
        "RandLoRA": ("RandLoraConfig", "RandLoraModel"),
        "RoAd": ("RoadConfig", "RoadModel"),
        "Shadow": ("ShadowConfig", "ShadowModel"),
        "SHiRA": ("ShiraConfig", "ShiraModel"),
        "Supertuning": ("SupertuningConfig", "SupertuningModel"),
        "TinyLoRA": ("TinyLoraConfig", "TinyLoraModel"),
        "trainable tokens": ("TrainableTokensConfig", "TrainableTokensModel", "TrainableTokensWrapper"),
        "UniLoRA": ("UniLoraConfig", "UniLoraModel"),
        "VB-LoRA": ("VBLoRAConfig", "VBLoRAModel"),
        "VeRA": ("VeraConfig", "VeraModel"),
        "WaveFT": ("WaveFTConfig", "WaveFTModel"),
        "X-LoRA": ("XLoraConfig", "XLoraModel"),
        "adaption prompt": ("AdaptionPromptConfig", "AdaptionPromptModel"),
        "conversion of other methods to LoRA": ("convert_to_lora", "save_as_lora"),
    },
    _PROMPT: {
        "prefix tuning": (
            "PrefixTuningConfig",
            "PrefixEncoder",
            "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
            "bloom_model_postprocess_past_key_value",
            "initialize_kv_prefix_from_past_key_values",
            "initialize_kv_prefix_from_text",
            "prompt_embeddings_from_past_key_values",
        ),
        "prompt tuning": ("PromptTuningConfig", "PromptEmbedding", "PromptTuningInit"),
        "P-tuning": ("PromptEncoderConfig", "PromptEncoder", "PromptEncoderReparameterizationType"),
        "multitask prompt tuning": ("MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"),
        "CPT": ("CPTConfig", "CPTEmbedding"),
        "cartridges": ("CartridgeConfig", "CartridgeEncoder", "compose_cartridge_adapters"),
    },
    _LORA_EXTRA: {
        "initialization (LoRA-GA)": ("LoraGAConfig", "preprocess_loraga"),
        "variant (Arrow)": ("ArrowConfig", "create_arrow_model"),
        "variant (BD-LoRA)": ("BdLoraConfig",),
        "variant (KaSA)": ("KasaConfig",),
        "variant (MonteCLoRA)": ("MontecloraConfig",),
        "variant (VeLoRA)": ("VeloraConfig",),
        "target selection helper (KappaTune)": ("find_kappa_target_modules",),
        "runtime option (ephemeral GPU offload)": ("LoraRuntimeConfig",),
    },
}

UNSUPPORTED: dict[str, str] = {
    name: reason.format(method=method)
    for reason, methods in _FAMILIES.items()
    for method, names in methods.items()
    for name in names
}


class UnsupportedPeftName(ImportError):
    """A peft name that has no lora_engine counterpart; the message says why."""


def unsupported_name(module_name: str, name: str) -> Exception:
    """The error a package ``__getattr__`` raises for ``name``: ``UnsupportedPeftName`` for a peft name in
    ``UNSUPPORTED``, else the usual ``AttributeError``."""
    if name in UNSUPPORTED:
        return UnsupportedPeftName(
            f"peft's {name} is {UNSUPPORTED[name]}, so {module_name} has no {name}", name=name
        )
    return AttributeError(f"module {module_name!r} has no attribute {name!r}")


class PromptLearningConfig(PeftConfig):
    """peft's base class of prompt-learning configs: kept so ``isinstance(config, PromptLearningConfig)`` works
    (it is False for every lora_engine config). Creating one raises ``UnsupportedPeftName``."""

    def __init__(self, *args, **kwargs):
        raise UnsupportedPeftName(
            "PromptLearningConfig is the base of peft's prompt-learning configs; lora_engine implements LoRA only",
            name="PromptLearningConfig",
        )
