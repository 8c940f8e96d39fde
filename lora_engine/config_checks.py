"""Type and range checks of every `LoraConfig` field, and the rule that keeps config regexes from hanging.

A config may come from a file someone else wrote, so each field is checked for its JSON type (a bool must be a
bool, not a truthy 1 or "yes"), its range (ranks positive, scalings finite in fp32) and its size. Errors are
`ValueError`s naming the field, the value, and what would be right.

Regexes (a str `target_modules` or `exclude_modules`, `modules_to_save` and `layers_pattern` entries, the keys
of `rank_pattern` and `alpha_pattern`) are matched against every module name, so a pattern that backtracks
catastrophically would hang a load. They are refused, not timed: a pattern must compile, be at most
`MAX_PATTERN_LENGTH` characters, use no backreference, put no repeat (`*`, `+`, `{m,n}`) or alternation inside a
repeat, and hold at most `MAX_REPEATS` repeats (with peft's implicit `.*` prefix, four adjacent `.*` cost
~0.2 ms on a 70-character name; each more multiplies that by the name's length). Lists are capped: name lists
at `MAX_NAMES` entries, regex collections at `MAX_PATTERNS`.
"""

from __future__ import annotations

import math
import re
from re import _constants as sre_constants  # noqa: PLC2701 - the stdlib's own regex parser, no other source
from re import _parser as sre_parser  # noqa: PLC2701
from typing import Any

MAX_PATTERN_LENGTH = 1_000
MAX_REPEATS = 3
MAX_NAMES = 65_536
MAX_PATTERNS = 4_096
# A scaling alpha / r (r >= 1) is at most |alpha|; it must be representable in fp32, the widest compute dtype
# the kernels use for the LoRA product.
_FP32_MAX = 3.4028234663852886e38

_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT)
_BACKREFERENCES = (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{field}={value!r:.200}: must be true or false (a JSON bool), not {type(value).__name__}"
        )


def check_optional_str(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{field}={value!r:.200}: must be a str or null")


def check_optional_dict(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{field}={value!r:.200}: must be a JSON object or null")


def check_alpha(field: str, value: Any) -> None:
    """A finite number whose scaling (alpha / r, r >= 1) stays finite in fp32."""
    if not is_number(value) or not math.isfinite(value) or abs(value) > _FP32_MAX:
        raise ValueError(
            f"{field}={value!r:.200}: must be a number finite in fp32 (|alpha| <= 3.4e38), since the LoRA scaling "
            "alpha / r is applied in fp32 or narrower"
        )


def check_rank(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r:.200}: the rank must be a positive int")


def check_pattern(field: str, pattern: Any) -> None:
    """``pattern`` is a str regex that cannot backtrack catastrophically (see the module docstring)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field} entry {pattern!r:.200}: must be a non-empty str")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"{field} pattern of {len(pattern)} characters: at most {MAX_PATTERN_LENGTH} are allowed"
        )
    try:
        parsed = sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"{field} pattern {pattern!r:.200} is not a valid regex: {error}") from None
    problem = _backtracking_problem(parsed, inside_repeat=False)
    if problem is None and _count_repeats(parsed) > MAX_REPEATS:
        problem = f"it has more than {MAX_REPEATS} repeats (*, +, {{m,n}})"
    if problem:
        raise ValueError(
            f"{field} pattern {pattern!r:.200} is refused because {problem}: such patterns can take exponential "
            "time to match module names. Rewrite it without nested repeats, e.g. '.*\\.(q|v)_proj'"
        )


def _children(item) -> list:
    """The sub-patterns inside one parsed regex item."""
    op, av = item
    if op in _REPEATS or op is sre_constants.POSSESSIVE_REPEAT:
        return [av[2]]
    if op is sre_constants.SUBPATTERN:
        return [av[3]]
    if op is sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op is sre_constants.ATOMIC_GROUP:
        return [av]
    return []


def _backtracking_problem(parsed, inside_repeat: bool) -> str | None:
    for item in parsed:
        op, av = item
        if op in _BACKREFERENCES:
            return "it uses a backreference"
        is_repeat = op in _REPEATS and av[1] > 1
        if inside_repeat and (is_repeat or op is sre_constants.BRANCH):
            return "it nests a repeat or an alternation inside a repeat"
        for child in _children(item):
            problem = _backtracking_problem(child, inside_repeat or is_repeat)
            if problem:
                return problem
    return None


def _count_repeats(parsed) -> int:
    count = 0
    for item in parsed:
        op, av = item
        count += op in _REPEATS and av[1] > 1
        count += sum(_count_repeats(child) for child in _children(item))
    return count


def check_names(field: str, value: Any, regex_entries: bool) -> None:
    """A list/tuple/set of non-empty str (each a safe regex when ``regex_entries``), capped in length."""
    if not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"{field}={value!r:.200}: must be a list of module names")
    limit = MAX_PATTERNS if regex_entries else MAX_NAMES
    if len(value) > limit:
        raise ValueError(f"{field} has {len(value)} entries: at most {limit} are allowed")
    for entry in value:
        if regex_entries:
            check_pattern(field, entry)
        elif not isinstance(entry, str) or not entry:
            raise ValueError(f"{field} entry {entry!r:.200}: module names must be non-empty str")


def check_targets(field: str, value: Any) -> None:
    """``target_modules``/``exclude_modules``: None, a safe regex str (or "all-linear"), or a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        check_pattern(field, value)
    else:
        check_names(field, value, regex_entries=False)


def check_layers_to_transform(value: Any) -> None:
    if value is None:
        return
    entries = value if isinstance(value, list | tuple) else [value]
    if len(entries) > MAX_NAMES or not all(
        isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0 for entry in entries
    ):
        raise ValueError(
            f"layers_to_transform={value!r:.200}: must be a layer index (int >= 0) or a list of them"
        )


def check_pattern_dict(field: str, value: Any, check_value) -> None:
    if not isinstance(value, dict):
        raise ValueError(
            f"{field}={value!r:.200}: must be a JSON object mapping module-name regexes to values"
        )
    if len(value) > MAX_PATTERNS:
        raise ValueError(f"{field} has {len(value)} keys: at most {MAX_PATTERNS} are allowed")
    for key, item in value.items():
        check_pattern(f"{field} key", key)
        check_value(f"{field}[{key!r:.100}]", item)
