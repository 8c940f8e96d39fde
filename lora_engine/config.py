"""Adapter configuration: `LoraConfig` and the `adapter_config.json` file it reads and writes.

The file format is peft 0.21.2's: the same keys, defaults and meanings, so that an adapter folder written by
either library loads in the other. Plain LoRA, DoRA (`use_dora`), `lora_bias` and the EVA and CorDA initialisations
(`EvaConfig`, `CordaConfig`) are implemented; peft's other LoRA variants and initialisations are accepted at their
defaults and refused, with a message saying so, when set.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_engine import config_checks
from lora_engine.file_checks import AdapterFileError, read_config_dict
from lora_engine.initialization.data_driven_init_configs import CordaConfig, EvaConfig, as_sub_config
from lora_engine.initialization.loftq_config import resolve_loftq_config
from lora_engine.layers.inits import is_weight_derived
from lora_engine.peft_format import CONFIG_NAME, PEFT_FORMAT_VERSION
from lora_engine.serialization import atomic_write
from lora_engine.unsupported_options import FLAGS, INIT_CONFIGS, PEFT_ONLY_INITS, WHEN_GIVEN


class PeftType(str, enum.Enum):
    """The adapter method; peft's enum has many more, lora_engine implements only LoRA."""

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """The model head an adapter is for; peft uses it to pick the `PeftModelFor...` wrapper class."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def _parse_peft_type(value: PeftType | str) -> PeftType:
    try:
        return PeftType(value)
    except ValueError:
        raise ValueError(
            f"peft_type={value!r} is not supported: lora_engine only supports peft_type 'LORA'"
        ) from None


def _to_json_value(value: Any) -> Any:
    """`value` with sets as sorted lists (so saved files are deterministic), enums as their str values,
    sub-configs (``EvaConfig``, ``CordaConfig``) as dicts and paths as str."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json_value(dataclasses.asdict(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_to_json_value(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(item) for item in value]
    return value


@dataclass
class PeftConfig:
    """Fields every peft adapter config has, and reading and writing `adapter_config.json`.

    `peft_type` says which config class a file holds; `task_type` which model head it is for;
    `base_model_name_or_path` and `revision` name the base model; `auto_mapping` records the base model's class
    when `task_type` is None; `peft_version` the format (`PEFT_FORMAT_VERSION` unless loaded from a file);
    `inference_mode` whether the adapter is frozen.
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                allowed = ", ".join(repr(task.value) for task in TaskType)
                raise ValueError(
                    f"task_type={self.task_type!r} is not a task type; use one of {allowed}"
                ) from None
        if self.peft_type is not None:
            self.peft_type = _parse_peft_type(self.peft_type)
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    @property
    def is_prompt_learning(self) -> bool:
        """Always False: LoRA adds no virtual tokens (transformers' Trainer reads this)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-able value: sets as sorted lists, enums as their str values. A new dict."""
        return {
            config_field.name: _to_json_value(getattr(self, config_field.name))
            for config_field in fields(self)
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `to_dict()` to `save_directory/adapter_config.json`, creating the folder if needed.

        The write is atomic: a failure leaves any existing file as it was, and no temporary file behind.
        `auto_mapping_dict=` (a dict), as peft's PeftModel passes it, replaces the written `auto_mapping`;
        other keywords are accepted for peft's signature and ignored. `inference_mode` is written as it is.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_directory {save_directory!r} is a file; pass a folder")
        config_dict = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            config_dict["auto_mapping"] = _to_json_value(kwargs["auto_mapping_dict"])
        # Serialise before touching the disk: an unserialisable value fails here.
        text = json.dumps(config_dict, indent=2, sort_keys=True)
        os.makedirs(save_directory, exist_ok=True)
        atomic_write(
            os.path.join(save_directory, CONFIG_NAME),
            lambda path: Path(path).write_text(text, encoding="utf-8"),
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load `adapter_config.json` from a local folder (`/subfolder` if given); keyword fields override it.

        Called on `PeftConfig`, returns the class `peft_type` names (LoraConfig). Raises FileNotFoundError if
        the folder or the file is missing (the Hugging Face Hub is not searched), ValueError if the file is not a
        JSON object or names another peft_type, TypeError for a keyword that is not a field.
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if subfolder is not None:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{folder!r} is not a local folder; lora_engine loads adapters from local folders only "
                "(download one from the Hub first, e.g. with huggingface_hub.snapshot_download)"
            )
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder!r} has no {CONFIG_NAME}")
        return cls.from_file_dict(config_path, read_config_dict(config_path), **kwargs)

    @classmethod
    def from_file_dict(cls, config_path: str | os.PathLike, config_dict: dict, **kwargs: Any) -> PeftConfig:
        """Build a config from `config_dict`, read from the file `config_path`; keyword fields override it.

        Every invalid value is an `AdapterFileError` (a ValueError) naming the file and the field; a keyword
        that is not a field is a TypeError.
        """
        config_cls = cls._class_for(kwargs.get("peft_type", "LORA"))
        field_names = {config_field.name for config_field in fields(config_cls)}
        unknown_kwargs = sorted(set(kwargs) - field_names)
        if unknown_kwargs:
            raise TypeError(
                f"{config_cls.__name__}.from_pretrained got keywords {unknown_kwargs} that are not fields"
            )
        try:
            config_cls = cls._class_for(kwargs.get("peft_type", config_dict.get("peft_type")))
            return config_cls.from_dict({**config_dict, **kwargs})
        except (ValueError, TypeError) as error:
            raise AdapterFileError(config_path, str(error)) from error

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> PeftConfig:
        """Build a config from `config_dict` (not mutated); called on `PeftConfig`, the class `peft_type` names.

        Keys that are not fields (written by a newer peft) are dropped with a warning naming them, as is
        `runtime_config`, which peft keeps only in memory. Raises ValueError for a peft_type other than LORA.
        """
        config_cls = cls._class_for(config_dict.get("peft_type"))
        field_names = {config_field.name for config_field in fields(config_cls)}
        if "runtime_config" in config_dict:
            warnings.warn(
                "ignoring the `runtime_config` key: runtime settings are not read from files", stacklevel=2
            )
        unknown_keys = sorted(set(config_dict) - field_names - {"runtime_config"})
        if unknown_keys:
            warnings.warn(
                f"ignoring keys {unknown_keys} that are not {config_cls.__name__} fields; they were probably written "
                f"by a newer peft than {PEFT_FORMAT_VERSION}, whose format lora_engine reads",
                stacklevel=2,
            )
        return config_cls(**{key: value for key, value in config_dict.items() if key in field_names})

    @classmethod
    def _class_for(cls, peft_type: PeftType | str | None) -> type[PeftConfig]:
        """The config class to build for `peft_type`: `cls`, or LoraConfig when `cls` is the base class."""
        if peft_type is not None:
            _parse_peft_type(peft_type)
        elif cls is PeftConfig:
            raise ValueError(
                "the config has no 'peft_type' key, so its config class is unknown; expected 'LORA'"
            )
        return LoraConfig if cls is PeftConfig else cls


_KNOWN_INITS = (
    "True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora', 'orthogonal', 'loftq', 'eva' or 'corda'"
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LoraConfig(PeftConfig):
    """Which modules get a LoRA adapter, and the adapter's shape and scaling; peft 0.21.2's fields and defaults.

    A targeted layer `W₀` computes `x ↦ W₀x + s·B(A(dropout(x)))` with `A` `(r, in)`, `B` `(out, r)` and
    `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and `alpha_pattern` map
    module-name regexes to per-module `r` and `lora_alpha`. `target_modules` is a str regex (full match) or a
    set of names (exact or `.`-suffix match); a list or tuple becomes a set, as does `exclude_modules`.
    `init_lora_weights` is True (A kaiming-uniform, B zero), False (both random), "gaussian", or one derived from
    the base weight (dense layers only): "pissa", "pissa_niter_<K>", "olora" (these two replace the base weight
    by the residual `W − s·B A`) or "orthogonal"; or "loftq" with `loftq_config` (a `LoftQConfig` or its dict), which
    replaces the base weight by its NF4/int8 round trip `Q` and sets `B A ≈ W − Q`.

    "eva" and "corda" are data-driven: "eva" starts `B` at zero and `initialize_lora_eva_weights` then sets `A`
    (and may redistribute ranks) from a dataloader, with `eva_config` (an `EvaConfig`); "corda" needs
    `preprocess_corda` run on the base model first and replaces the base weight like PiSSA (`corda_config`, a
    `CordaConfig`). A missing sub-config becomes the default one, with peft's warning.

    `use_dora` turns the adapters into DoRA adapters (Linear, Conv1D, Embedding, Conv1d/2d/3d, 4-bit Linear);
    `lora_bias` gives `lora_B` a bias (not with DoRA, and only with True/False inits, as in peft). Every peft field
    exists so files round-trip, but the other LoRA variants and their sub-configs (`use_qalora`,
    `megatron_config`, ...) must stay at their defaults: ValueError otherwise, as for any invalid value.
    """

    r: int = 8
    target_modules: set[str] | list[str] | str | None = None
    exclude_modules: set[str] | list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: EvaConfig | dict | None = None
    corda_config: CordaConfig | dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self.loftq_config = resolve_loftq_config(self.init_lora_weights, self.loftq_config)
        self._check_values()
        self._check_layer_selection()
        self._refuse_unsupported_options()
        self._default_data_driven_sub_configs()

    def _check_values(self) -> None:
        """Every field's type and range (``config_checks``); ValueError naming the first bad field."""
        config_checks.check_rank("r", self.r)
        config_checks.check_alpha("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be a probability in [0, 1)")
        if not isinstance(self.bias, str) or self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}: must be 'none', 'all' or 'lora_only'")
        for name in (
            "fan_in_fan_out",
            "use_rslora",
            "inference_mode",
            "ensure_weight_tying",
            "use_dora",
            "lora_bias",
            *FLAGS,
        ):
            config_checks.check_bool(name, getattr(self, name))
        for name in ("peft_version", "base_model_name_or_path", "revision", "megatron_core"):
            config_checks.check_optional_str(name, getattr(self, name))
        for name in ("auto_mapping", *INIT_CONFIGS):
            config_checks.check_optional_dict(name, getattr(self, name))
        config_checks.check_targets("target_modules", self.target_modules)
        config_checks.check_targets("exclude_modules", self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            raise ValueError(
                f"modules_to_save={self.modules_to_save!r} is a str; it must be a list of module names, "
                f"e.g. [{self.modules_to_save!r}]"
            )
        if self.modules_to_save is not None:
            config_checks.check_names("modules_to_save", self.modules_to_save, regex_entries=True)
        if self.layers_pattern is not None:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            config_checks.check_names("layers_pattern", patterns, regex_entries=True)
        config_checks.check_layers_to_transform(self.layers_to_transform)
        config_checks.check_pattern_dict("rank_pattern", self.rank_pattern, config_checks.check_rank)
        config_checks.check_pattern_dict("alpha_pattern", self.alpha_pattern, config_checks.check_alpha)
        if isinstance(self.qalora_group_size, bool) or not isinstance(self.qalora_group_size, int):
            raise ValueError(f"qalora_group_size={self.qalora_group_size!r}: must be an int")
        init = self.init_lora_weights
        if self.lora_bias and init not in (True, False):
            raise ValueError(
                f"lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={init!r}"
            )
        if self.lora_bias and self.use_dora:
            raise ValueError(
                "lora_bias=True is not supported for DoRA (use_dora=True); pass one of them only"
            )
        try:
            self.eva_config = as_sub_config("eva_config", self.eva_config, EvaConfig)
            self.corda_config = as_sub_config("corda_config", self.corda_config, CordaConfig)
        except TypeError as error:
            raise ValueError(str(error)) from None
        if (
            init is True
            or init is False
            or init in ("gaussian", "loftq", "eva", "corda")
            or is_weight_derived(init)
        ):
            return
        if isinstance(init, str) and PEFT_ONLY_INITS.fullmatch(init):
            raise ValueError(
                f"init_lora_weights={init!r} is a peft option that lora_engine does not support yet; "
                f"use one of {_KNOWN_INITS}"
            )
        raise ValueError(f"init_lora_weights={init!r:.200} is unknown; use one of {_KNOWN_INITS}")

    def _check_layer_selection(self) -> None:
        # peft's rules: a str target_modules is a regex over full names, which selects layers by itself.
        if isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                value = getattr(self, name)
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} cannot be used with a str (regex) target_modules="
                        f"{self.target_modules!r}; pass target_modules as a list of names, or leave {name} None"
                    )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)"
            )

    def _refuse_unsupported_options(self) -> None:
        given = [name for name in FLAGS if getattr(self, name)]
        given += [name for name in WHEN_GIVEN if getattr(self, name) is not None]
        given += [name for name in INIT_CONFIGS if getattr(self, name)]
        if given:
            name = given[0]
            raise ValueError(
                f"{name}={getattr(self, name)!r}: this peft option is not supported yet by lora_engine; "
                "leave it at its default"
            )

    def _default_data_driven_sub_configs(self) -> None:
        """peft's rules, in peft's order: a data-driven init without its sub-config gets the default one; a
        sub-config without its init is kept but ignored. Both warn. (peft skips these rules when it has just
        dropped an ignored ``loftq_config``, leaving ``init_lora_weights="eva"`` without an ``eva_config``.)"""
        if self.init_lora_weights == "loftq":
            return
        if self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn(
                "`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config."
            )
            self.eva_config = EvaConfig()
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.")
        elif self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn(
                "`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA config."
            )
            self.corda_config = CordaConfig()
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn(
                "`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'."
            )
