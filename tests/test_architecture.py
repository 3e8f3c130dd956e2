"""The layers of docs/architecture.md, held: no module imports from a layer below it.

Imports are read from the source (module level and inside functions alike; `TYPE_CHECKING`
blocks excepted), and so is every string that names a module of the package (what
`importlib.import_module` or a registry by name would import), so a new module must be placed
in a layer here and in the document.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "crosskd_cli"

# Layer of each module (dotted, without "crosskd_cli."); a prefix ending in "." covers a folder.
LAYERS = {
    0: ["errors", "specs", "schema", "bounded", "config", "runs", "run_record", "state_dir",
        "progress", "metrics", "safe_pickle", "data.builtin", "data.coco_layout", "data.source",
        "batching", "schedule", "plots",
        "__init__"],
    1: ["structures", "targets", "losses", "box_coders", "drawing", "data."],
    2: ["models.backbones", "models.mobilenet", "models.swin", "models.fpn", "models.dense_head",
        "models.detector", "criteria."],
    3: ["families"],
    4: ["models.build", "models.__init__", "distill", "kd_terms", "preset_checks", "postprocess",
        "pairing",
        "legacy", "checkpoint", "inspection", "backbone_import", "pretrained",
        "prediction_gap", "runtime"],
    5: ["engine", "evaluate", "jobs", "importing", "teachers", "quickstart", "api", "predicting",
        "eval_pictures", "exporting", "target_maps"],
    6: ["commands.", "cli", "__main__"],
}  # fmt: skip


def layer_of(module: str) -> int:
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or (name.endswith(".") and module.startswith(name)):
                return layer
    raise AssertionError(f"crosskd_cli.{module} is in no layer: add it to LAYERS and the doc")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[dotted] = path
    return found


def imports_of(path: Path) -> set[str]:
    """crosskd_cli modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("crosskd_cli")
        ):
            base = node.module.removeprefix("crosskd_cli").lstrip(".")
            for alias in node.names:  # `from crosskd_cli import state_dir` names a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                names.add(candidate if candidate in MODULES else base or "__init__")
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("crosskd_cli.") for a in node.names
                      if a.name.startswith("crosskd_cli.")}  # fmt: skip
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = node.value.removeprefix("crosskd_cli.")  # a module named by a string
            if node.value.startswith("crosskd_cli.") and _module_file(named) in MODULES:
                names.add(named)
    return {_module_file(n) for n in names}


def _module_file(name: str) -> str:
    """A package import (`crosskd_cli.models`) means its `__init__`."""
    return f"{name}.__init__" if f"{name}.__init__" in MODULES else name


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_below_it(module):
    own = layer_of(module)
    upward = [(dep, layer_of(dep)) for dep in imports_of(MODULES[module]) if layer_of(dep) > own]
    assert not upward, f"{module} (layer {own}) imports from higher layers: {upward}"


def test_a_module_named_by_a_string_counts_as_an_import(tmp_path):
    """`Registry("crosskd_cli.families", ...)` in the spec once imported the family table from
    the torch-free layer on every parse, unseen by a test that read import statements only."""
    source = tmp_path / "named.py"
    source.write_text('"""Docs mention crosskd_cli.families."""\nTABLE = "crosskd_cli.families"\n')
    assert imports_of(source) == {"families"}


def test_only_the_engine_imports_accelerate():
    importers = [
        name
        for name, path in MODULES.items()
        if any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                (getattr(node, "module", None) or alias.name).startswith("accelerate")
                for alias in node.names
            )
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    # `inspect --env` only prints Accelerate's version
    assert set(importers) == {"engine", "commands.inspect"}
