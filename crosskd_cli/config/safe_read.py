"""Readers of untrusted YAML and JSON that refuse what would not end: aliases and deep nesting.

`yaml.safe_load` builds any object graph the text describes: a 2 KB preset whose anchors
alias each other ("billion laughs") becomes a value that every later walk (the parser,
config.yaml, rich) expands to billions of nodes; and its composer recurses once per level, so
deep nesting raises RecursionError. JSON has no aliases, but Python's decoder recurses too, and
so do `copy.deepcopy` (pycocotools copies the categories) and pickling. Presets, `--set` values
and checkpoint metadata are small, so these readers simply refuse aliases and any value nested
deeper than `MAX_DEPTH` levels, with an `Unbounded` error the caller words for its own input.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

MAX_DEPTH = 32  # presets nest 3-4 levels, checkpoint metadata 5: far below any recursion limit


class Unbounded(ValueError):
    """Text that parses, but into a value too deep (or, through aliases, too large) to walk."""


def too_deep(limit: int) -> Unbounded:
    return Unbounded(f"nested deeper than {limit} levels")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and counts nesting while composing, before the
    recursion that would overflow."""

    max_depth = MAX_DEPTH
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise Unbounded(
                f"uses the alias *{event.anchor} (line {event.start_mark.line + 1}); anchors "
                "and aliases are not read, write the value out"
            )
        if self._depth >= self.max_depth:
            raise too_deep(self.max_depth)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.1 (PyYAML) reads `1e-4` as a string: its floats need a dot. Users write learning
# rates that way on the command line and in presets, so scientific notation is a float too.
_SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` without aliases and at most MAX_DEPTH levels deep.

    Raises yaml.YAMLError for invalid YAML, Unbounded for an alias or deep nesting.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_json(text: str | bytes, max_depth: int | None = MAX_DEPTH) -> Any:
    """`json.loads(text)`, refusing with Unbounded (not RecursionError) what nests too deep
    for the decoder, and any value deeper than `max_depth` levels (None: no further check,
    for files too large to walk in Python).

    Raises ValueError (json.JSONDecodeError, UnicodeDecodeError, Unbounded) for bad text.
    """
    try:
        data = json.loads(text)
    except RecursionError:  # the C decoder stops near the interpreter's recursion limit
        refusal = too_deep(max_depth) if max_depth else Unbounded("nested too deeply to read")
        raise refusal from None
    if max_depth is not None and depth(data, stop=max_depth) > max_depth:
        raise too_deep(max_depth)
    return data


def depth(value: Any, stop: int | None = None) -> int:
    """Levels of lists/dicts in `value` (a scalar is 0, [1] is 1), walked without recursion;
    the walk ends as soon as `stop` is exceeded."""
    containers = (dict, list, tuple)
    deepest = 0
    stack = [(value, 1)] if isinstance(value, containers) else []
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if stop is not None and deepest > stop:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, level + 1) for c in children if isinstance(c, containers))
    return deepest
