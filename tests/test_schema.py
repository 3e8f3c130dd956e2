"""The one dataclass parser: type conversion, and how the preset and metadata policies differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from crosskd_cli.config.schema import (
    METADATA,
    PRESET,
    MaxLength,
    Range,
    parse,
    refuse_unknown_name,
    to_plain,
)
from crosskd_cli.errors import CheckpointError, PresetError


@dataclass(frozen=True)
class Inner:
    size: int = 3
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    scale: tuple[int, int] = (4, 2)
    steps: tuple[float, ...] = ()
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    flag: bool = False
    anything: Any = None


@dataclass(frozen=True)
class Choice:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    level: Literal[1, 2] | None = None


def preset_error(data: Any, cls: type = Outer) -> PresetError:
    with pytest.raises(PresetError) as info:
        parse(cls, data, where="p.yaml", policy=PRESET)
    return info.value


def test_every_supported_type_converts_and_arrays_become_tuples_where_typed():
    data = {
        "name": "a",
        "inner": {"size": 5, "ratio": 2},
        "scale": [640, 480],
        "steps": [1, 2.5],
        "tags": ["x", "y"],
        "extra": {"k": [1]},
        "limit": None,
        "flag": True,
        "anything": {"free": "form"},
    }
    for policy in (PRESET, METADATA):
        out = parse(Outer, data, where="w", policy=policy)
        assert out == Outer("a", Inner(5, 2.0), (640, 480), (1.0, 2.5), ["x", "y"], {"k": [1]},
                            None, True, {"free": "form"})  # fmt: skip
        assert isinstance(out.inner.ratio, float) and isinstance(out.steps[0], float)
        assert to_plain(out) == data | {"inner": {"size": 5, "ratio": 2.0}, "steps": [1.0, 2.5]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"flag": 1}, "'flag' must be bool, got 1."),
        ({"flag": 0}, "'flag' must be bool, got 0."),
        ({"inner": {"size": True}}, "'inner.size' must be int, got True."),
        ({"inner": {"ratio": False}}, "'inner.ratio' must be float, got False."),
        ({"inner": {"size": 2.0}}, "'inner.size' must be int, got 2.0."),
        ({"limit": "many"}, "'limit' must be int, got 'many'."),
        ({"scale": [1, 2, 3]}, "'scale' must be a list of 2 items, got [1, 2, 3]."),
        ({"steps": [1, "x"]}, "'steps[1]' must be float, got 'x'."),
        ({"tags": "x"}, "'tags' must be a list, got 'x'."),
        ({"extra": []}, "'extra' must be a mapping, got []."),
        ({"inner": 3}, "'inner' must be a mapping, got 3."),
    ],
)
def test_a_preset_type_error_names_the_dotted_path_the_type_and_the_value(data, message):
    error = preset_error({"name": "a"} | data)
    assert error.message == f"p.yaml: {message}"
    path = message.split("'")[1].split("[")[0]  # --set replaces a whole list, not one item
    assert error.hint == f"Fix it in the preset or with --set {path}=VALUE"


def test_a_metadata_type_error_names_the_type_hint_and_the_source():
    with pytest.raises(CheckpointError) as info:
        parse(Outer, {"name": "a", "limit": "many"}, where="ck.safetensors", policy=METADATA)
    assert info.value.message == (
        "Checkpoint 'ck.safetensors' metadata field 'limit' should be int | None, got 'many'."
    )


def test_a_literal_takes_only_its_options_and_suggests_the_closest():
    assert parse(Choice, {"optimizer": "adamw", "level": 2}, where="w", policy=PRESET) == Choice(
        "adamw", 2
    )
    error = preset_error({"optimizer": "adamv"}, Choice)
    assert error.message == "p.yaml: 'optimizer' must be one of 'sgd', 'adamw', got 'adamv'."
    assert error.hint == "Did you mean 'adamw'? Fix it in the preset or with --set optimizer=VALUE"
    # True == 1 and 1.0 == 1 in Python, yet neither is the option 1
    for wrong in (True, 1.0, 3):
        error = preset_error({"level": wrong}, Choice)
        assert error.message == f"p.yaml: 'level' must be one of 1, 2, got {wrong!r}."


def test_a_missing_field_without_default_is_an_error_under_both_policies():
    assert preset_error({}).message == "p.yaml: missing key 'name'."
    with pytest.raises(CheckpointError, match="'ck' metadata lacks the field 'name'"):
        parse(Outer, {}, where="ck", policy=METADATA)


def test_the_preset_policy_refuses_an_unknown_key_the_metadata_policy_ignores_it():
    data = {"name": "a", "inner": {"size": 4, "ratio": 1.0, "sise": 4}}  # the rest defaulted
    error = preset_error(data)
    assert error.message == "p.yaml: unknown key 'inner.sise'."
    assert error.hint == "Did you mean 'size'?"
    assert parse(Outer, data, where="ck", policy=METADATA) == Outer("a", Inner(4, 1.0))


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys():
    assert preset_error({"name": "a", "inner": {"zzz": 1}}).hint == "Valid keys: size, ratio"


def test_both_policies_fill_missing_top_level_defaults_only_presets_fill_nested_ones():
    top_only = {"name": "a"}
    for policy in (PRESET, METADATA):
        assert parse(Outer, top_only, where="w", policy=policy) == Outer("a")
    nested = {"name": "a", "inner": {"size": 4}}
    assert parse(Outer, nested, where="w", policy=PRESET) == Outer("a", Inner(4, 0.5))
    # a nested spec (the model) in metadata must be complete: its defaults may not be what the
    # weights were trained with
    with pytest.raises(CheckpointError, match="lacks the field 'inner.ratio'"):
        parse(Outer, nested, where="w", policy=METADATA)


@dataclass(frozen=True)
class Limits:
    count: Annotated[int, Range(1)] = 2
    rate: Annotated[float, Range(0, 1, high_open=True)] = 0.5
    clip: Annotated[float, Range(0, low_open=True)] | None = None
    sides: tuple[Annotated[int, Range(32, 64)], ...] = (32,)
    plain: float = 1.0
    note: Annotated[str, MaxLength(5)] = ""


@pytest.mark.parametrize(
    ("data", "path", "expected", "given"),
    [
        ({"count": 0}, "count", ">= 1", "0"),
        ({"rate": 1}, "rate", "in [0, 1)", "1.0"),
        ({"clip": 0}, "clip", "> 0", "0.0"),
        ({"sides": [32, 65]}, "sides[1]", "in [32, 64]", "65"),
        ({"plain": float("nan")}, "plain", "a finite number", "nan"),
        ({"clip": float("inf")}, "clip", "a finite number", "inf"),
        ({"note": "longer"}, "note", "at most 5 characters long", "'longer'"),
    ],
)
def test_ranges_and_finiteness_are_checked_under_both_policies(data, path, expected, given):
    error = preset_error(data, Limits)
    assert error.message == f"p.yaml: '{path}' must be {expected}, got {given}."
    settable = path.split("[")[0]  # --set replaces the whole list
    assert error.hint == f"Fix it in the preset or with --set {settable}=VALUE"
    with pytest.raises(CheckpointError) as info:
        parse(Limits, data, where="ck", policy=METADATA)
    assert info.value.message == (
        f"Checkpoint 'ck' metadata field '{path}' should be {expected}, got {given}."
    )


def test_values_in_range_pass_unchanged_and_bounds_read_as_typed():
    data = {"count": 1, "rate": 0, "clip": 35, "sides": [32, 64]}
    assert parse(Limits, data, where="w", policy=PRESET) == Limits(1, 0.0, 35.0, (32, 64), 1.0)
    assert Range(0, 1).words() == "in [0, 1]" and Range(0.5).words() == ">= 0.5"


def test_a_name_outside_a_table_is_refused_as_a_choice_under_both_policies():
    """The names that index torch-side tables (head families, backbones) are checked after
    parsing, worded as the parser words a choice, with the closest name as the hint."""
    families = ["gfl", "retinanet", "atss", "fcos"]
    refuse_unknown_name("atss", families, where="p.yaml", path="model.family", policy=PRESET)
    with pytest.raises(PresetError) as info:
        refuse_unknown_name("atts", families, where="p.yaml", path="model.family", policy=PRESET)
    expected = "one of 'gfl', 'retinanet', 'atss', 'fcos'"
    assert info.value.message == f"p.yaml: 'model.family' must be {expected}, got 'atts'."
    assert (
        info.value.hint
        == "Did you mean 'atss'? Fix it in the preset or with --set model.family=VALUE"
    )
    with pytest.raises(CheckpointError) as info:
        refuse_unknown_name("yolo", families, where="ck", path="model.family", policy=METADATA)
    assert info.value.message == (
        f"Checkpoint 'ck' metadata field 'model.family' should be {expected}, got 'yolo'."
    )
