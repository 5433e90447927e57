"""One definition per option: its field, default, command-line flag and help, and the checks of its value.

The request classes (:class:`~SegExplainLib.application.model_source.ModelSource`,
:class:`~SegExplainLib.application.requests.ExplainRequest`, :class:`~SegExplainLib.application.requests.CaseRun`)
declare their fields with :func:`option`. The command line builds its options from those fields (:func:`add_options`,
defaults and choices included), reads them back (:func:`from_namespace`), and each class writes its command-line words
(:func:`words`) and reads its JSON (:func:`from_json`) through the same fields, so a value is checked in one place
whichever way it came.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..errors import SegExplainError


class WordParser(argparse.ArgumentParser):
    """A parser of command-line words that raises SegExplainError on bad words instead of ending the process."""

    def error(self, message: str):
        raise SegExplainError(f"{self.prog}: {message}")


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field appears on the command line.

    Attributes:
        flag: The option, e.g. ``"--radius"``; None for a field that is no option of ``segexplain explain``.
        help: Its help text.
        nargs: ``3``, ``6`` or ``"+"`` for a tuple field.
        type: The type argparse converts each word to.
        metavar: Argparse's name of the value.
        switch: A flag without value (``store_true``) that sets the field True.
        repeat: A repeatable option (``append``), one word per item of :attr:`write`.
        choices: The values argparse accepts.
        required: The command line needs it.
        read: Turns argparse's value into the field's (e.g. ``KEY=JSON`` words into a dict); raises SegExplainError.
        write: Turns the field's value into the option's words (the inverse of ``read``).
    """

    flag: str | None = None
    help: str = ""
    nargs: int | str | None = None
    type: Callable[[str], Any] = str
    metavar: str | None = None
    switch: bool = False
    repeat: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False
    read: Callable[[Any], Any] | None = None
    write: Callable[[Any], list[str]] | None = None


def option(default: Any = dataclasses.MISSING, flag: str | None = None, help: str = "",  # noqa: A002 - argparse's
           **flag_options: Any) -> Any:
    """A dataclass field with its command-line :class:`Flag`; a dict default is made anew for each object."""
    metadata = {"flag": Flag(flag, help, **flag_options)}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(cls: type, name: str) -> Flag:
    """The :class:`Flag` of field ``name`` of ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["flag"]


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (a dict default anew)."""
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


def add_options(group: Any, cls: type, names: Sequence[str]) -> None:
    """Add the command-line options of the fields ``names`` of ``cls`` to an argparse parser or group."""
    for name in names:
        meta = flag_of(cls, name)
        default = default_of(cls, name)
        if meta.switch:
            group.add_argument(meta.flag, dest=name, action="store_true", help=meta.help)
        elif meta.repeat:
            group.add_argument(meta.flag, dest=name, action="append", default=[], metavar=meta.metavar,
                               help=meta.help)
        else:
            group.add_argument(meta.flag, dest=name, nargs=meta.nargs, type=meta.type, metavar=meta.metavar,
                               choices=meta.choices, required=meta.required, help=meta.help,
                               default=None if meta.required or isinstance(default, dict) else default)


def from_namespace(cls: type, args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The field values of ``names`` from the parsed command line (converted by each flag's ``read``)."""
    values = {}
    for name in names:
        meta, value = flag_of(cls, name), getattr(args, name)
        values[name] = meta.read(value) if meta.read else tuple(value) if isinstance(value, list) else value
    return values


def words(obj: Any, names: Sequence[str]) -> list[str]:
    """The command-line words of the fields ``names`` of ``obj`` that differ from their defaults."""
    result: list[str] = []
    for name in names:
        meta, value = flag_of(type(obj), name), getattr(obj, name)
        if value == default_of(type(obj), name) and not meta.required:
            continue
        if meta.switch:
            result.append(meta.flag)
        elif meta.repeat:
            result += [word for item in meta.write(value) for word in (meta.flag, item)]
        elif meta.write:
            result += [meta.flag, *meta.write(value)]
        elif isinstance(value, tuple):
            result += [meta.flag, *map(str, value)]
        else:
            result += [meta.flag, str(value)]
    return result


def to_json(obj: Any) -> dict[str, Any]:
    """``obj``'s fields as a JSON object (tuples as lists, nested request classes as their own JSON)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return value.to_json()
        return list(value) if isinstance(value, tuple) else value

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def json_object(text: str, what: str, *, example: str = "") -> dict[str, Any]:
    """``text`` read as a JSON object; otherwise a SegExplainError naming ``what`` (and ``example``) and the text."""
    expected = f"{what} must be a JSON object" + (f" such as {example}" if example else "")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SegExplainError(f"{expected}, got {text[:80]!r} ({error.msg})") from None
    if not isinstance(value, dict):
        raise SegExplainError(f"{expected}, got {text[:80]!r}")
    return value


def from_json(cls: type, data: Any, nested: dict[str, type] | None = None) -> Any:
    """A ``cls`` from its JSON object, checked as at construction; unknown keys are refused by name."""
    if isinstance(data, str):
        data = json_object(data, f"a {cls.__name__}")
    if not isinstance(data, dict):
        raise SegExplainError(f"a {cls.__name__} must be a JSON object, got {data!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SegExplainError(f"{cls.__name__} has no key(s) {', '.join(map(repr, unknown))}; expected some of "
                              f"{', '.join(known)}")
    values = dict(data)
    for name, kind in (nested or {}).items():
        if name in values and values[name] is not None:
            values[name] = kind.from_json(values[name])
    return cls(**values)


class JsonFields:
    """What makes a request class JSON: its fields as a JSON object and back, checked as at construction.

    Attributes:
        nested_json: The fields that hold other request classes, read back by their own ``from_json``.
    """

    nested_json: ClassVar[dict[str, type]] = {}

    def to_json(self) -> dict[str, Any]:
        """This object as a JSON object (:meth:`from_json` reads it back)."""
        return to_json(self)

    @classmethod
    def from_json(cls, data: Any) -> Any:
        """An object from its JSON object (or its text), checked as at construction; unknown keys are refused by
        name."""
        return from_json(cls, data, cls.nested_json)


# The checks of the fields: each returns the value (tuples for sequences) or raises a one-line SegExplainError.

def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SegExplainError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise SegExplainError(f"{name} must be an integer{f' >= {minimum}' if minimum is not None else ''}, "
                              f"got {value!r}")
    return value


def check_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False,
                 below: float | None = None, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and ((minimum is not None and value < minimum) or (positive and value <= 0)
                    or (below is not None and value >= below)):
        bad = True
    if bad:
        bounds = [f">= {minimum:g}" if minimum is not None else "", "> 0" if positive else "",
                  f"< {below:g}" if below is not None else ""]
        raise SegExplainError(f"{name} must be a finite number {' and '.join(b for b in bounds if b)}".rstrip()
                              + f", got {value!r}")
    return float(value)


def check_text(name: str, value: Any, *, optional: bool = False, choices: Sequence[str] | None = None) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        expected = f"one of {', '.join(choices)}" if choices is not None else "a text"
        raise SegExplainError(f"{name} must be {expected}, got {value!r}")
    return value


def check_tuple(name: str, value: Any, *, length: int | None = None, kind: type = str,
                optional: bool = False) -> tuple | None:
    if value is None and optional:
        return None
    items = tuple(value) if isinstance(value, (list, tuple)) else None
    numbers = kind in (int, float)
    if items is None or (length is not None and len(items) != length) or any(
            isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind) for v in items):
        what = f"{length} " if length is not None else ""
        raise SegExplainError(f"{name} must be a list of {what}{'numbers' if numbers else 'texts'}"
                              f"{' (integers)' if kind is int else ''}, got {value!r}")
    return tuple(float(v) for v in items) if kind is float else items


def check_dict(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise SegExplainError(f"{name} must be a JSON object with text keys, got {value!r}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise SegExplainError(f"{name} must hold JSON values only, got {value!r} ({error})") from None
    return value


def json_text(text: str, what: str) -> Any:
    """A JSON value from a command-line word; a one-line error naming ``what`` otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SegExplainError(f"{what} must be JSON, got {text!r} ({error.msg})") from None
