"""Read foreign `.pth` checkpoints without running any code they pickle.

First `torch.load(weights_only=True)`, PyTorch's own allow-list. MMDetection 3.x files also
pickle training metadata (message hubs, numpy values) that it refuses, so the fallback is a
restricted unpickler: tensors, storages and plain containers are built, and every other class
becomes an inert placeholder that records its name and never runs. Callers then check that the
state dict itself holds only tensors, naming any class that stood in for one.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

# The globals a state dict of tensors needs; everything else is refused.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class Refused:
    """Stands in for a class the loader would not import: built from anything, runs nothing."""

    qualified_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    # pickle's BUILD, SETITEMS and APPENDS call these on what REDUCE returned
    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<refused {self.qualified_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    refused: set[str] = set()  # replaced per load by `load_restricted`

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in ALLOWED_GLOBALS or (
            module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES)
        )
        if allowed:
            return super().find_class(module, name)
        qualified = f"{module}.{name}"
        self.refused.add(qualified)
        return type(name, (Refused,), {"qualified_name": qualified})


def load_restricted(path: Path) -> tuple[Any, set[str]]:
    """(the unpickled object, names of the classes replaced by `Refused` placeholders)."""
    refused: set[str] = set()
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"refused": refused})
    module = types.ModuleType("crosskd_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    # torch's legacy (pre-zip) format reads its header with `pickle_module.load`: restricted too
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    return loaded, refused


def load_checkpoint_object(path: Path) -> tuple[Any, set[str]]:
    """torch.load with weights_only=True, else the restricted unpickler (see module doc)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), set()
    except pickle.UnpicklingError:
        return load_restricted(path)


def refused_inside(value: Any) -> set[str]:
    """Names of the placeholders anywhere inside `value` (dicts, lists, tuples)."""
    if isinstance(value, Refused):
        return {value.qualified_name}
    if isinstance(value, dict):
        items = list(value.keys()) + list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    else:
        return set()
    return set().union(*(refused_inside(v) for v in items)) if items else set()
