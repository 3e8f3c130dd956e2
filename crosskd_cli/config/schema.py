"""One strict parser from plain data (YAML, JSON) to typed dataclasses, under explicit policies.

Besides the type, a field may state the values it takes, declared on its type hint with
`typing.Annotated`, so the limit sits beside the field it guards and is checked for every
input the parser reads (presets, `--set` overrides, checkpoint metadata):

    batch_size: Annotated[int, Range(1)] = 2  # >= 1
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9  # in [0, 1)
    scale: tuple[Side, Side] = (1333, 800)  # each item in [32, 8192] (Side is an alias)

`Range` bounds a number (and every float must be finite: nan and inf are always refused);
`MaxLength` bounds a string or list. A choice fixed in the code is a `Literal[...]`; a name
looked up in a table of torch code (a head family, a backbone) stays a plain `str` here and is
checked by `refuse_unknown_name` where that table lives, worded as the parser words a choice
(this module imports nothing of the package but errors). The aliases below name the ranges
fields share.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from crosskd_cli.errors import CheckpointError, CrossKDError, PresetError, closest

_NONE = type(None)


@dataclass(frozen=True)
class Policy:
    """What one kind of input may leave out or add, and how its errors read."""

    raises: type[CrossKDError]
    refuse_unknown: bool  # False: keys a newer writer added are skipped, so old code still reads
    nested_defaults: bool  # False: only the top dataclass's own missing fields take defaults
    describe: Callable[[Any], str]  # an expected type in the reader's words
    root: str | None  # what messages call the top level; None = the class name
    # Message templates, formatted with where, path, expected and value (a repr)
    wrong_type: str
    wrong_type_hint: str | None
    missing: str
    missing_hint: str | None
    unknown: str = "{where}: unknown key '{path}'."

    def type_error(
        self, where: str, path: str, expected: str, value: Any, close: str | None = None
    ) -> CrossKDError:
        """The error for a value that is not `expected`; `close` is a likely intended value."""
        message = self.wrong_type.format(
            where=where, path=path, expected=expected, value=shown(value)
        )
        # --set replaces a whole list: it has no syntax for one item (scale[0])
        settable = re.sub(r"\[\d+\]", "", path)
        hint = self.wrong_type_hint and self.wrong_type_hint.format(path=settable)
        if close is not None:
            hint = f"Did you mean {close!r}?" + (f" {hint}" if hint else "")
        return self.raises(message, hint=hint)


def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: a message stays one readable line even
    when the value is a megabyte of hostile input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def yaml_words(tp: Any) -> str:
    """A type as a preset author reads it: a mapping, a list of 2 items, int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return yaml_words(args[0])
    if _is_union(tp):
        # A preset author fixes the value, not the null: "float", not "float | None"
        return yaml_words(next(a for a in args if a is not _NONE))
    if origin is typing.Literal:
        return _one_of(args)
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "a mapping"
    if origin is tuple and args and not _variadic(args):
        return f"a list of {len(args)} items"
    if origin in (tuple, list) or tp in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def python_words(tp: Any) -> str:
    """A type as its hint reads, for JSON written by code: tuple[int, int], int | None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return python_words(args[0])
    if _is_union(tp):
        return " | ".join("None" if a is _NONE else python_words(a) for a in args)
    if origin is typing.Literal:
        return _one_of(args)
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "an object"
    if origin is not None and args:  # tuple[int, int], with any range markers left out
        inner = ", ".join("..." if a is Ellipsis else python_words(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    return getattr(tp, "__name__", str(tp))


@dataclass(frozen=True)
class Range:
    """A number's allowed interval: Range(1) is >= 1, Range(0, low_open=True) is > 0,
    Range(0, 1, high_open=True) is [0, 1). None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is refused
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def words(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)': what the error says the value must be."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


@dataclass(frozen=True)
class MaxLength:
    """A string (or list) of at most `high` characters (items): text that is echoed, parsed
    or resolved stays small."""

    high: int

    def holds(self, value: Any) -> bool:
        return len(value) <= self.high

    def words(self, value: Any) -> str:
        unit = "characters" if isinstance(value, str) else "items"
        return f"at most {self.high} {unit} long"


# The ranges fields share (see the module docstring)
Count = Annotated[int, Range(1)]  # sizes, intervals and counts that cannot be zero
Index = Annotated[int, Range(0)]  # indices, iteration counts that may be zero
Positive = Annotated[float, Range(0, low_open=True)]  # rates, temperatures, clip norms
NonNegative = Annotated[float, Range(0)]  # loss weights, decays, factors
Fraction = Annotated[float, Range(0, 1)]  # probabilities and ratios
Side = Annotated[int, Range(32, 8192)]  # an image side in pixels
Channels = Annotated[int, Range(1, 4096)]  # a layer's width


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else repr(value)


PRESET = Policy(
    raises=PresetError,
    refuse_unknown=True,  # a typo in a preset must not silently train the default instead
    nested_defaults=True,  # presets list only what differs from the defaults
    describe=yaml_words,
    root=None,
    wrong_type="{where}: '{path}' must be {expected}, got {value}.",
    wrong_type_hint="Fix it in the preset or with --set {path}=VALUE",
    missing="{where}: missing key '{path}'.",
    missing_hint=None,
)

METADATA = Policy(
    raises=CheckpointError,
    refuse_unknown=False,  # fields a newer crosskd added must not stop this one reading the file
    # Defaults stand in only for CheckpointMeta's own later additions (training, metrics): a
    # ModelSpec field missing from a file is not guessed, as today's default may not be the
    # architecture the weights were trained with.
    nested_defaults=False,
    describe=python_words,
    root="metadata",
    wrong_type="Checkpoint '{where}' metadata field '{path}' should be {expected}, got {value}.",
    wrong_type_hint="The metadata was edited or written by another tool; re-save the checkpoint.",
    missing="Checkpoint '{where}' metadata lacks the field '{path}'.",
    missing_hint="It was not written by this crosskd; re-save it or import the weights.",
)


def parse(cls: type, data: Any, *, where: str, policy: Policy) -> Any:
    """Dataclass `cls` built from plain `data`, checked field by field against its type hints;
    a problem raises `policy.raises` naming `where` and the dotted path of the bad key."""
    try:
        return _build(cls, data, "", policy, top=True)
    except _Problem as problem:
        raise _explain(problem, where, policy.root or cls.__name__, policy) from None


def refuse_unknown_name(
    value: str, names: typing.Iterable[str], *, where: str, path: str, policy: Policy
) -> None:
    """Raise `policy`'s error, worded as for a `Literal` choice (with the closest name), when
    `value` is not one of `names`: the tables of head families and backbones are torch code,
    so their names are checked after parsing, by the code that holds them."""
    names = tuple(names)
    if value not in names:
        raise _explain(_Problem("choice", path, value, choices=names), where, path, policy)


def to_plain(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON-friendly data (tuples become lists); fields the parser
    never reads (`init=False`, e.g. where a preset was loaded from) are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


class _Problem(Exception):
    """Raised inside the parser; `parse` words it by the policy once the path is known.

    kind: "type" (value is not tp), "choice" (not one of a Literal's options, or of `choices`
    for `refuse_unknown_name`), "range" (choices: what the value must be, e.g. ">= 1"), "missing" or
    "unknown" (choices: the valid keys).
    """

    def __init__(self, kind: str, path: str, value: Any = None, tp: Any = None, choices=()):
        super().__init__(kind, path)
        self.kind, self.path, self.value, self.tp, self.choices = kind, path, value, tp, choices


def _explain(problem: _Problem, where: str, root: str, policy: Policy) -> CrossKDError:
    path = problem.path or root
    if problem.kind == "missing":
        message = policy.missing.format(where=where, path=path)
        return policy.raises(message, hint=policy.missing_hint)
    if problem.kind == "unknown":
        valid = problem.choices
        close = closest(str(problem.value), valid)
        hint = f"Did you mean '{close}'?" if close else f"Valid keys: {', '.join(valid)}"
        return policy.raises(policy.unknown.format(where=where, path=path), hint=hint)
    if problem.kind == "range":
        return policy.type_error(where, path, problem.choices, problem.value)
    close = None
    expected = policy.describe(problem.tp)
    if problem.kind == "choice":
        options = problem.choices or typing.get_args(problem.tp)
        expected = _one_of(tuple(options))
        if isinstance(problem.value, str):
            strings = [o for o in options if isinstance(o, str)]
            close = closest(problem.value, strings)
    return policy.type_error(where, path, expected, problem.value, close)


def _build(cls: type, data: Any, path: str, policy: Policy, *, top: bool) -> Any:
    if not isinstance(data, dict):
        raise _Problem("type", path, data, cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if policy.refuse_unknown:
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise _Problem("unknown", _join(path, unknown[0]), unknown[0], choices=list(fields))
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {
        name: _convert(hints[name], value, _join(path, name), policy)
        for name, value in data.items()
        if name in fields
    }
    fill = top or policy.nested_defaults
    for name, f in fields.items():
        if name not in kwargs and not (fill and _has_default(f)):
            raise _Problem("missing", _join(path, name))
    return cls(**kwargs)


# YAML 1.1 (PyYAML) reads these words as booleans: `--set train.mixed_precision=no` arrives as
# False. A choice spelled so (Accelerate's "no") is what the user wrote.
_YAML11_BOOLS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml11_spelling(value: Any, options: tuple[Any, ...]) -> str | None:
    """The one string option of a Literal that YAML 1.1 would have read as `value`, if any."""
    if not isinstance(value, bool):
        return None
    words = [o for o in options if isinstance(o, str) and o.lower() in _YAML11_BOOLS[value]]
    return words[0] if len(words) == 1 else None


def _convert(tp: Any, value: Any, path: str, policy: Policy) -> Any:
    """`value` as type `tp`; arrays become tuples where `tp` says tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        return _check_markers(_convert(args[0], value, path, policy), args[1:], path)
    if _is_union(tp):
        if value is None and _NONE in args:
            return None
        problems = []
        for arg in (a for a in args if a is not _NONE):
            try:
                return _convert(arg, value, path, policy)
            except _Problem as problem:
                problems.append(problem)
        if problems[0].kind == "type" and problems[0].path == path:
            raise _Problem("type", path, value, tp)  # the value itself fits no member: name all
        raise problems[0]  # a deeper key is wrong: name that one
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, policy, top=False)
    if origin is typing.Literal:
        # type() too, so that True does not pass for 1 nor 1.0 for 1
        if any(value == option and type(value) is type(option) for option in args):
            return value
        spelled = _yaml11_spelling(value, args)
        if spelled is not None:
            return spelled
        raise _Problem("choice", path, value, tp)
    if origin in (tuple, list) or tp in (tuple, list):
        return _convert_array(tp, value, path, policy)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Problem("type", path, value, tp)
        key_type, value_type = args or (Any, Any)
        out = {}
        for k, v in value.items():
            key_path = _join(path, k)
            out[_convert(key_type, k, key_path, policy)] = _convert(value_type, v, key_path, policy)
        return out
    if tp not in (bool, int, float, str):
        # a field type this parser was never taught: a bug in crosskd, not bad input
        raise TypeError(f"schema cannot parse fields of type {tp!r} (at '{path}')")
    # bool is an int subclass: an int field must refuse true/false, and a bool field 1 and 0
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML's .nan and .inf, JSON's NaN and Infinity
            raise _Problem("range", path, value, tp, choices="a finite number")
        return float(value)
    if isinstance(value, tp) and (tp is bool) == isinstance(value, bool):
        return value
    raise _Problem("type", path, value, tp)


def _check_markers(value: Any, markers: tuple, path: str) -> Any:
    """`value` (already of the annotated type) against each Range / MaxLength marker."""
    for marker in markers:
        if isinstance(marker, Range) and not marker.holds(value):
            raise _Problem("range", path, value, choices=marker.words())
        if isinstance(marker, MaxLength) and not marker.holds(value):
            raise _Problem("range", path, value, choices=marker.words(value))
    return value


def _convert_array(tp: Any, value: Any, path: str, policy: Policy) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _Problem("type", path, value, tp)
    if origin is tuple and args and not _variadic(args):
        if len(value) != len(args):
            raise _Problem("type", path, value, tp)
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    pairs = enumerate(zip(item_types, value, strict=True))
    items = [_convert(t, v, f"{path}[{i}]", policy) for i, (t, v) in pairs]
    return items if origin is list else tuple(items)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _variadic(args: tuple) -> bool:
    return len(args) == 2 and args[1] is Ellipsis


def _one_of(options: tuple) -> str:
    return "one of " + ", ".join(repr(o) for o in options)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
