"""peft 0.21.2's exception and warning classes, so ``except``/``pytest.warns`` clauses written for peft match ours."""


class PeftError(Exception):
    """Base class of the errors peft (and lora_engine) raise for its own reasons."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """No module of the model matched ``target_modules`` (a ``ValueError``, as before peft had this class)."""


class PeftWarning(UserWarning):
    """Base class of peft's own warnings."""
