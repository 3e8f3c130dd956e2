"""The layers of docs/architecture.md, held over packages: nothing imports from a layer above it.

Imports are read from the source (module level and inside functions alike; `TYPE_CHECKING`
blocks excepted), and so is every string that names a module of the package (what
`importlib.import_module` or a registry by name would import), so a new package or top-level
module must be placed in a layer here and in the document.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "crosskd_cli"

# Layer of each package or top-level module (without "crosskd_cli."), lowest first. A module may
# import its own package and the packages of its layer and below; packages of one layer must
# not import each other in a circle (test_no_two_packages_import_each_other).
LAYERS = {
    0: ["errors", "__init__", "config", "storage"],
    1: ["detection", "data", "viz"],
    2: ["criteria"],
    3: ["families"],
    4: ["models"],
    5: ["checkpoints"],
    6: ["distill"],
    7: ["engine"],
    8: ["inference"],
    9: ["runs"],
    10: ["api", "commands", "cli", "__main__"],
}
TORCH_FREE = ("config", "storage")  # parse presets, claim run folders: no torch, no package code


def unit_of(module: str) -> str:
    """The package (or top-level module) a dotted module name belongs to."""
    return module.split(".")[0]


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for layer, names in LAYERS.items():
        if unit in names:
            return layer
    raise AssertionError(f"crosskd_cli.{unit} is in no layer: add it to LAYERS and the doc")


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
def test_no_module_imports_from_a_layer_above_it(module):
    own = layer_of(module)
    upward = [(dep, layer_of(dep)) for dep in imports_of(MODULES[module]) if layer_of(dep) > own]
    assert not upward, f"{module} (layer {own}) imports from higher layers: {upward}"


def test_no_two_packages_import_each_other():
    """Within a layer too, the packages form no circle (`data` may use `detection`, not both)."""
    edges: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        deps = {unit_of(dep) for dep in imports_of(path)} - {unit_of(module)}
        edges.setdefault(unit_of(module), set()).update(deps)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in edges.get(start, ())
        )

    circles = sorted(unit for unit in edges if reaches(unit, unit, {unit}))
    assert not circles, f"packages in an import circle: {circles}"


def test_no_import_cycle_among_modules():
    """Every import counts, function-level ones too: a cycle hidden inside a function (config
    importing the model factory to check a preset) once held 11 modules together."""
    edges = {module: imports_of(path) - {module} for module, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [module, dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("package", TORCH_FREE)
def test_the_torch_free_packages_import_only_themselves_and_errors(package):
    for module, path in MODULES.items():
        if unit_of(module) == package:
            others = {unit_of(dep) for dep in imports_of(path)} - {package, "errors"}
            assert not others, f"{module} imports {sorted(others)}"
            text = path.read_text()
            assert "import torch" not in text and "from torch" not in text, module


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
    assert {unit_of(name) for name in importers} == {"engine", "commands"}
    assert [name for name in importers if unit_of(name) == "commands"] == ["commands.inspect"]


def test_benchmarks_are_a_package_run_with_python_m_without_path_edits():
    """`python -m benchmarks.NAME` from the checkout: no sys.path edits, no E402 exemptions,
    shared helpers imported from `benchmarks.common`, no copies of them."""
    folder = PACKAGE.parent / "benchmarks"
    assert (folder / "__init__.py").is_file()
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "noqa: E402" not in text, path.name
        assert "def machine(" not in text or path.name == "common.py", path.name
        assert "python benchmarks/" not in text, path.name  # usage lines name the -m form
