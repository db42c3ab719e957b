"""Does a parsed value (YAML, ``-p name=value``) have the type a dataclass field declares?

Method parameters arrive as YAML scalars and lists, and a dataclass does not check types: without this
``population=2.5`` or ``tolerance=abc`` reaches arithmetic deep in a run and fails there, after the
work, as an exception name. Only the shapes of annotation the parameters use are understood (plain
types, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``Any``); anything else is accepted unchecked.
"""

from __future__ import annotations

import types
import typing
from typing import Any

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _options(hint: Any) -> tuple[Any, ...]:
    """``float | None`` -> (float, NoneType); any other hint -> (hint,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def matches(value: Any, hint: Any) -> bool:
    """True when ``value`` fits ``hint`` (an int fits a float; a list fits a tuple, as YAML has no tuples; a
    single item fits a list of such items, as a command-line ``-p name=value`` gives one)."""
    for option in _options(hint):
        if option is Any or option is typing.Any:
            return True
        if option is type(None):
            if value is None:
                return True
            continue
        origin = typing.get_origin(option)
        if origin in (list, tuple):
            inner = [a for a in typing.get_args(option) if a is not Ellipsis]
            if isinstance(value, (list, tuple)):
                if len(inner) != 1 or all(matches(item, inner[0]) for item in value):
                    return True
            elif len(inner) == 1 and inner[0] is not list and matches(value, inner[0]):
                return True  # one item where a list is wanted (``-p dense_layers=conv_*``): methods wrap it
            continue
        if origin is not None or not isinstance(option, type):
            return True  # a shape not understood here: the method's own checks decide
        if isinstance(value, bool) and option is not bool:
            continue  # ``true`` is no count nor number
        if isinstance(value, option) or option is float and isinstance(value, int):
            return True
    return False


def describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null"; ``list[str]`` -> "a list whose items are each a string"."""
    words = []
    for option in _options(hint):
        origin = typing.get_origin(option)
        if option is type(None):
            words.append("null")
        elif origin in (list, tuple):
            inner = [a for a in typing.get_args(option) if a is not Ellipsis]
            words.append(f"a list whose items are each {describe(inner[0])}" if len(inner) == 1 else "a list")
        else:
            words.append(_NAMES.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(words)


def field_type_problem(cls: type, values: dict[str, Any]) -> str | None:
    """The first ``name value must be ...`` among ``values`` for the dataclass ``cls`` (None: all fit)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            return f"{name} {value!r} must be {describe(hints[name])}"
    return None
