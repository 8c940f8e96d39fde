"""transformers' Trainer, accelerate and TRL recognise our ``PeftModel`` and ``LoraConfig`` as peft's.

Those libraries ask "is this a peft model / config?" with ``isinstance`` against peft's own classes. peft's
classes are plain (not ABCs), so no registration can make ``isinstance(ours, peft.PeftModel)`` true, and
lora_engine never imports peft. Instead, the functions and names those libraries check with are taught about our
classes, in each module that holds them, when that module is imported (or at once if it already was):

- ``accelerate.utils.modeling.is_peft_model`` (bound again in ``accelerate.utils``,
  ``accelerate.utils.fsdp_utils`` and every ``trl`` trainer module): also true for our ``PeftModel``;
- ``transformers.trainer_utils._is_peft_model`` (bound again in ``transformers.trainer`` and
  ``transformers.integrations.neftune``): also true for our ``PeftModel`` and ``PeftMixedModel``. The Trainer then reads the wrapped
  model's ``forward`` signature (so a ``PeftModel`` without ``task_type``, whose ``forward`` takes
  ``*args, **kwargs``, keeps its batch columns), loss kwargs and labels, as it does for peft's;
- in ``trl`` modules, the names TRL imported from peft when peft is installed: ``PeftConfig`` and
  ``BaseTunerLayer`` (used only in ``isinstance``) accept ours too, and ``get_peft_model`` wraps with lora_engine
  when given our ``LoraConfig``, with peft otherwise.

Each replacement is done by identity (a module global that *is* the library's original object), so peft models
and configs take exactly the library's own path. A library upgrade that renames or drops one of these raises
``UnsupportedLibraryError`` on import of that library module, naming what is missing: never a silent fall-back.

TRL imports peft by itself when peft is installed (``trl/trainer/sft_trainer.py`` takes ``PeftConfig`` and
others from peft under ``if is_peft_available():``). Without peft, the modules of ``SFTTrainer``, ``DPOTrainer`` and
``trl.trainer.utils`` get our classes under the names they would have imported from peft, and an
``is_peft_available`` that answers True (else TRL refuses ``peft_config=``): ``_WITHOUT_PEFT`` below. TRL's other
trainers (GRPO, KTO, RLOO, reward, distillation) are taught only when peft is installed, and are untested.

Modules are taught after they run, by a ``sys.meta_path`` finder that wraps the loader of modules of the three
packages; importing anything else is untouched. At ``import lora_engine``, modules already loaded are taught
too, and any other loaded module that bound one of the two checking functions gets the taught one.

Installing costs nothing at ``import lora_engine``: this module imports neither torch nor the three libraries nor
our model classes. The taught checks look our classes up in ``sys.modules`` when called (a class whose module was
never imported has no instances, so the answer is the library's own); our classes are imported only when TRL is
loaded without peft and its modules must be given them under peft's names (torch is loaded by then).
"""

from __future__ import annotations

import sys
from types import ModuleType

WATCHED_PACKAGES = ("accelerate", "transformers", "trl")

# The module that defines each checking function, and the function's name there.
_DEFINITIONS = {
    "accelerate.utils.modeling": "is_peft_model",
    "transformers.trainer_utils": "_is_peft_model",
}
# Modules whose binding of a checking function must have been replaced once they are imported: the code we tested.
_REQUIRED_BINDINGS = {
    "accelerate.utils.fsdp_utils": ("is_peft_model",),
    "transformers.trainer": ("_is_peft_model",),
    "transformers.integrations.neftune": ("_is_peft_model",),
    "trl.trainer.sft_trainer": ("is_peft_model", "PeftConfig", "get_peft_model", "BaseTunerLayer"),
    "trl.trainer.dpo_trainer": ("is_peft_model", "PeftConfig", "get_peft_model", "BaseTunerLayer"),
}
# Names a trl module gets from peft, which need peft to be in sys.modules (TRL imported it).
_PEFT_NAMES = ("PeftConfig", "get_peft_model", "BaseTunerLayer")


# Where our classes that the libraries must recognise are defined: (module, class name).
_PEFT_MODEL = ("lora_engine.peft_model", "PeftModel")
_PEFT_MIXED_MODEL = ("lora_engine.mixed", "PeftMixedModel")
_PEFT_CONFIG = ("lora_engine.config", "PeftConfig")
_LORA_LAYER = ("lora_engine.layers.base", "LoraLayer")


class UnsupportedLibraryError(ImportError):
    """A library changed where it checks for peft models, so lora_engine cannot teach that check."""


def _loaded(*classes: tuple[str, str]) -> tuple[type, ...]:
    """Those of our ``(module, class name)`` classes whose module has been imported. A class whose module was never
    imported has no instances and no subclasses, so ``isinstance``/``issubclass`` against the rest is exact."""
    found = []
    for module_name, class_name in classes:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


# id(original object) -> (original, replacement); a module global is replaced only if it *is* the original.
_everywhere: dict[int, tuple[object, object]] = {}
_in_trl: dict[int, tuple[object, object]] = {}


def _unsupported(module_name: str, what: str) -> UnsupportedLibraryError:
    import importlib.metadata  # an error path: kept out of `import lora_engine` (tens of ms)

    package = module_name.partition(".")[0]
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    return UnsupportedLibraryError(
        f"lora_engine cannot make {package} {version} recognise its PeftModel: in {module_name}, {what}. "
        "lora_engine/integrations/recognition.py supports accelerate 1.15, transformers 5.24 and trl 1.16; "
        "use one of those versions or update that module."
    )


def _teach_accelerate_check(original):
    def is_peft_model(model) -> bool:
        """accelerate's ``is_peft_model``, also true for a lora_engine ``PeftModel`` (inside DDP/FSDP/compile)."""
        ours = _loaded(_PEFT_MODEL)
        if ours:
            from accelerate.utils import (
                extract_model_from_parallel,  # loaded: this replaces accelerate's check
            )

            if isinstance(extract_model_from_parallel(model), ours):
                return True
        return original(model)

    return is_peft_model


def _teach_transformers_check(original):
    def _is_peft_model(model) -> bool:
        """transformers' ``_is_peft_model``, also true for a lora_engine ``PeftModel`` or ``PeftMixedModel`` (the
        two classes transformers checks for)."""
        return isinstance(model, _loaded(_PEFT_MODEL, _PEFT_MIXED_MODEL)) or original(model)

    return _is_peft_model


def _either(peft_class: type, our_class: tuple[str, str]) -> type:
    """A class that ``isinstance``/``issubclass`` answer True for, for peft's class or ours (``(module, class
    name)``, looked up when asked); other attributes are peft's class's."""

    class _EitherMeta(type):
        def __instancecheck__(cls, instance) -> bool:
            return isinstance(instance, (peft_class, *_loaded(our_class)))

        def __subclasscheck__(cls, subclass) -> bool:
            return issubclass(subclass, (peft_class, *_loaded(our_class)))

        def __getattr__(cls, name):
            return getattr(peft_class, name)

    doc = f"peft's {peft_class.__name__} or lora_engine's {our_class[1]} (integrations/recognition.py)."
    return _EitherMeta(peft_class.__name__, (), {"__doc__": doc, "__module__": __name__})


def _dispatching_get_peft_model(peft_get_peft_model):
    def get_peft_model(model, peft_config, *args, **kwargs):
        """lora_engine's ``get_peft_model`` for a lora_engine config, peft's for a peft config."""
        if isinstance(peft_config, _loaded(_PEFT_CONFIG)):
            from lora_engine.mapping import get_peft_model as lora_engine_get_peft_model

            return lora_engine_get_peft_model(model, peft_config, *args, **kwargs)
        return peft_get_peft_model(model, peft_config, *args, **kwargs)

    return get_peft_model


def _imported_peft() -> ModuleType | None:
    """peft if something else imported it (``sys.modules["peft"]`` may also be None: import blocked)."""
    return sys.modules.get("peft")


def _register_peft_names(peft: ModuleType) -> None:
    """Replacements for the peft names TRL imported from ``peft`` (imported by TRL, never here)."""
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    originals = {
        "PeftConfig": (peft.PeftConfig, lambda cls: _either(cls, _PEFT_CONFIG)),
        "get_peft_model": (peft.get_peft_model, _dispatching_get_peft_model),
    }
    if tuners_utils is not None:
        originals["BaseTunerLayer"] = (tuners_utils.BaseTunerLayer, lambda cls: _either(cls, _LORA_LAYER))
    for original, make in originals.values():
        if id(original) not in _in_trl:
            _in_trl[id(original)] = (original, make(original))


def _replace(module: ModuleType, replacements: dict[int, tuple[object, object]]) -> None:
    for name, value in list(vars(module).items()):
        entry = replacements.get(id(value))
        if entry is not None and entry[0] is value:
            setattr(module, name, entry[1])


def teach(module: ModuleType) -> None:
    """Replace, in ``module``'s globals, every library check object that has a lora_engine-aware replacement.

    Raises:
        UnsupportedLibraryError: ``module`` is one this file relies on and lacks a name it should define or bind.
    """
    name = module.__name__
    if name in _DEFINITIONS:
        function_name = _DEFINITIONS[name]
        original = getattr(module, function_name, None)
        if not callable(original):
            raise _unsupported(name, f"there is no function {function_name}")
        make = _teach_accelerate_check if name.startswith("accelerate") else _teach_transformers_check
        _everywhere.setdefault(id(original), (original, make(original)))
    _replace(module, _everywhere)
    if name.startswith("trl"):
        peft = _imported_peft()
        if peft is not None:
            _register_peft_names(peft)
        _replace(module, _in_trl)
        if peft is None and name in _MODULES_WITHOUT_PEFT:
            _provide_peft_names(module, _names_without_peft(name))
    _check_required_bindings(module)


class _NoLoraEngineConfig:
    """Stands for a peft config class lora_engine has no counterpart of (``PrefixTuningConfig``): nothing is an
    instance of it."""


def _peft_is_available() -> bool:
    """``is_peft_available`` for the TRL modules below when peft is absent: lora_engine stands in for it."""
    return True


# The TRL modules we test, which get our classes when peft is not installed, in place of their skipped
# `from peft import ...` and of `is_peft_available` (False: it would refuse peft_config=).
_MODULES_WITHOUT_PEFT = ("trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.utils")


def _names_without_peft(module_name: str) -> dict[str, object]:
    """What ``module_name`` (one of ``_MODULES_WITHOUT_PEFT``) gets when peft is not installed. Imports our model
    classes: TRL is being imported, so torch and transformers already are."""
    from lora_engine.config import LoraConfig, PeftConfig
    from lora_engine.layers.base import LoraLayer
    from lora_engine.mapping import get_peft_model
    from lora_engine.peft_model import PeftModel

    if module_name == "trl.trainer.utils":
        return {
            "is_peft_available": _peft_is_available,
            "LoraConfig": LoraConfig,
            "PeftConfig": PeftConfig,
            "PeftModel": PeftModel,
        }
    trainer_names = {
        "is_peft_available": _peft_is_available,
        "PeftConfig": PeftConfig,
        "PeftModel": PeftModel,
        "get_peft_model": get_peft_model,
        "BaseTunerLayer": LoraLayer,
        "PrefixTuningConfig": _NoLoraEngineConfig,
    }
    if module_name == "trl.trainer.dpo_trainer":
        # DPO's LoraConfig only detects peft<0.20's target_parameters limitation, which lora_engine does not have.
        trainer_names["LoraConfig"] = _NoLoraEngineConfig
    return trainer_names


def _provide_peft_names(module: ModuleType, names: dict[str, object]) -> None:
    """Bind ``names`` in ``module``, which TRL loaded without peft: each must be absent, or ``is_peft_available``
    transformers' function."""
    from transformers.utils import is_peft_available

    for name, value in names.items():
        present = vars(module).get(name)
        if present is not None and present is not is_peft_available:
            raise _unsupported(
                module.__name__, f"{name} is defined without peft, which lora_engine did not expect"
            )
        if name == "is_peft_available" and present is None:
            raise _unsupported(module.__name__, "is_peft_available is gone")
        setattr(module, name, value)


def _check_required_bindings(module: ModuleType) -> None:
    name = module.__name__
    required = _REQUIRED_BINDINGS.get(name, ())
    replaced = {id(entry[1]) for entry in (*_everywhere.values(), *_in_trl.values())}
    if _imported_peft() is None:
        required = tuple(binding for binding in required if binding not in _PEFT_NAMES)
    for binding in required:
        if binding not in vars(module):
            raise _unsupported(name, f"the name {binding} is gone")
        if id(vars(module)[binding]) not in replaced:
            raise _unsupported(name, f"{binding} is no longer the object lora_engine knows how to replace")


class _TeachAfterExec:
    """Runs the real loader, then ``teach``es the new module. (A loader by protocol, not ``importlib.abc.Loader``,
    whose import costs ``import lora_engine`` tens of ms.)"""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        teach(module)

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ... as the real loader has them
        return getattr(self._loader, name)


class _TeachingFinder:
    """Finds modules of ``WATCHED_PACKAGES`` with the other finders and wraps their loader."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname.partition(".")[0] not in WATCHED_PACKAGES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _TeachAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Teach the already imported modules of ``WATCHED_PACKAGES`` (defining modules first), and put the finder
    that teaches the others on import at the front of ``sys.meta_path``. Idempotent."""
    if not any(isinstance(finder, _TeachingFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TeachingFinder())
    loaded = [module for name, module in list(sys.modules.items()) if _is_watched(name, module)]
    loaded.sort(key=lambda module: module.__name__ not in _DEFINITIONS)
    for module in loaded:
        teach(module)
    # Code imported before lora_engine (a user's `from accelerate.utils import is_peft_model`) bound the originals;
    # with neither library loaded yet (the usual `import lora_engine` first) there is nothing to replace.
    if not _everywhere:
        return
    for name, module in list(sys.modules.items()):
        if isinstance(module, ModuleType) and not _is_watched(name, module):
            _replace(module, _everywhere)


def _is_watched(name: str, module) -> bool:
    return isinstance(module, ModuleType) and name.partition(".")[0] in WATCHED_PACKAGES
