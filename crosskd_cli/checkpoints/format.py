"""Self-describing checkpoints: weights in a .safetensors file, their metadata in its header."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crosskd_cli import __version__
from crosskd_cli.checkpoints.legacy import upgrade_keys, upgrade_meta
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.safe_read import load_json
from crosskd_cli.config.schema import METADATA, Count, MaxLength, Side, parse
from crosskd_cli.errors import CheckpointError, ModelError
from crosskd_cli.models.build import check_model_names
from crosskd_cli.storage.files import atomic_path, remove_stale_temporaries

if TYPE_CHECKING:
    from crosskd_cli.config.presets import Preset

METADATA_KEY = "crosskd"  # the safetensors header entry holding CheckpointMeta as JSON
KINDS = ("teacher", "student")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
IMPORT_HINT = "Convert foreign weights with `crosskd teacher import FILE --preset NAME`."
_SHOWN = 5  # names listed per problem in a load_state_into error
MAX_SPEC_LENGTH = 20_000


@dataclass
class CheckpointMeta:
    """Everything `crosskd eval FILE` needs besides the weights; JSON in the file header."""

    model: ModelSpec  # rebuilds the architecture
    class_names: list[str]  # contiguous label -> class name
    category_ids: list[int]  # contiguous label -> original COCO category id
    preset: str  # preset name or path the model was trained from
    # data spec it was evaluated on, e.g. "builtin:shapes" or "/coco"; `crosskd eval FILE`
    # prints and resolves it, so it is bounded (4 paths of PATH_MAX fit)
    val_data: Annotated[str, MaxLength(MAX_SPEC_LENGTH)]
    image_scale: tuple[Side, Side]  # test-time keep-ratio resize (long side, short side)
    # batch size of the recorded metrics: `eval`'s default, which repeats the exact batches;
    # results do not depend on it (each image padded alone, collate.py), only kernels' last bits
    eval_batch_size: Count
    crosskd_version: str  # the crosskd that wrote the file
    kind: str  # "teacher" or "student"
    training: dict[str, Any] = field(default_factory=dict)  # epochs, method, wall time, ...
    metrics: dict[str, Any] = field(default_factory=dict)  # coco_metrics of the weights

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=_json_scalar)

    @classmethod
    def from_json(cls, text: str, source: str = "<metadata>") -> CheckpointMeta:
        """Strict parse under schema.METADATA: an ill-typed field, or a missing one that has no
        default, raises CheckpointError naming it and `source`; unknown fields (from a newer
        crosskd) are ignored."""
        try:
            data = load_json(text)
        except ValueError as err:  # not JSON, or nested too deep to be crosskd's (config.safe_read)
            raise CheckpointError(
                f"Checkpoint '{source}' has unreadable crosskd metadata: {err}.",
                hint="The file header is damaged; use another copy of the checkpoint.",
            ) from None
        meta = parse(cls, upgrade_meta(data), where=source, policy=METADATA)
        check_model_names(meta.model, where=source, policy=METADATA)
        _check_consistent(meta, source)
        return meta

    def class_mismatch(
        self, class_names: Sequence[str], category_ids: Sequence[int], source: str
    ) -> str | None:
        """Why data labelled with these classes does not fit these weights, None when it does:
        a model only speaks of the classes it predicts, in the order it predicts them."""
        if list(category_ids) == list(self.category_ids) and list(class_names) == list(
            self.class_names
        ):
            return None
        return (
            f"The checkpoint predicts {len(self.class_names)} classes "
            f"({', '.join(self.class_names[:4])}...) but data '{source}' has "
            f"{len(class_names)} ({', '.join(list(class_names)[:4])}...)."
        )

    @property
    def from_newer_crosskd(self) -> bool:
        """True when a newer major crosskd wrote the file: it loads, but callers may say so."""
        return _major(self.crosskd_version) > _major(__version__)


def make_meta(
    preset: Preset,
    model: ModelSpec,
    kind: str,
    *,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    val_data: str,
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> CheckpointMeta:
    """The metadata of weights made from `preset`, the one recipe for runs and imports alike:
    the preset's test-time scale is what reproduces the recorded metrics (its eval batch size,
    recorded too, repeats the very batches)."""
    return CheckpointMeta(
        model=model,
        class_names=list(class_names),
        category_ids=list(category_ids),
        preset=preset.name,
        val_data=val_data,
        image_scale=tuple(preset.data.scale),
        eval_batch_size=preset.train.eval_batch_size,
        crosskd_version=__version__,
        kind=kind,
        training=training,
        metrics=metrics if metrics is not None else {},
    )


def _json_scalar(value: Any) -> Any:
    """numpy / torch scalars (a metric or loss left unconverted) as plain Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    raise CheckpointError(
        f"Checkpoint metadata cannot hold a {type(value).__name__} ({value!r}).",
        hint="Store numbers, strings, lists and dicts in training/metrics.",
    )


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _bad_field(name: str, expected: str, value: Any, source: str) -> typing.NoReturn:
    raise METADATA.type_error(source, name, expected, value)


def _check_consistent(meta: CheckpointMeta, source: str) -> None:
    """Fields that must agree with each other, so evaluation cannot mislabel classes."""
    if meta.kind not in KINDS:
        _bad_field("kind", " or ".join(repr(k) for k in KINDS), meta.kind, source)
    counts = (len(meta.class_names), len(meta.category_ids), meta.model.num_classes)
    if len(set(counts)) != 1:
        raise CheckpointError(
            f"Checkpoint '{source}' metadata disagrees on the number of classes: "
            f"{counts[0]} class_names, {counts[1]} category_ids, model.num_classes {counts[2]}.",
            hint="Re-save the checkpoint with one entry per class in each list.",
        )
    from crosskd_cli.models.build import check_spec  # torchvision: only once metadata is read

    try:  # a model that cannot be built stops `eval` before it resolves (generates) data
        check_spec(meta.model)
    except ModelError as err:
        raise CheckpointError(
            f"Checkpoint '{source}' metadata describes a model that cannot be built: {err.message}",
            hint="The metadata was edited or written by another tool; re-save the checkpoint.",
        ) from None


def save_checkpoint(path: str | Path, state_dict: dict[str, Tensor], meta: CheckpointMeta) -> None:
    """Write `state_dict` (moved to CPU, contiguous, tied weights un-shared) with `meta` in the
    header, atomically: a crash or error leaves either the old file or the new one."""
    path = Path(path)
    text = meta.to_json()
    CheckpointMeta.from_json(text, source=str(path))  # never write a file we cannot read back
    tensors = _plain_tensors(state_dict)
    try:
        remove_stale_temporaries(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    except (OSError, SafetensorError) as err:
        raise _write_error(path, err) from err


def _write_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"Could not write checkpoint '{path}': {err}.",
        hint="Check free disk space and write permission in that folder.",
    )


def _plain_tensors(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, detached tensors; safetensors refuses tensors sharing memory (tied
    weights), so every tensor after the first on a storage is cloned."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"State dict entry '{name}' is a {type(value).__name__}, not a tensor.",
                hint="A checkpoint holds tensors only; put other values in the metadata.",
            )
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(storage)
        out[name] = tensor
    return out


def read_meta(path: str | Path) -> CheckpointMeta:
    """The metadata alone, from the file header (no tensor is read)."""
    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        hint = (
            IMPORT_HINT
            if path.suffix in PICKLE_SUFFIXES
            else "The file may be truncated or corrupt; copy or re-save it."
        )
        raise CheckpointError(f"'{path}' is not a crosskd checkpoint: {err}.", hint=hint) from err
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"'{path}' is a safetensors file without crosskd metadata.", hint=IMPORT_HINT
        )
    return CheckpointMeta.from_json(header[METADATA_KEY], source=str(path))


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """(state dict of CPU tensors, metadata). Safetensors only: nothing is ever unpickled.

    Key names of files from older crosskd versions are mapped onto today's (`checkpoints.legacy`).
    """
    meta = read_meta(path)
    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"'{path}' is not a crosskd checkpoint: its tensors cannot be read ({err}).",
            hint="The file may be truncated or corrupt; copy or re-save it.",
        ) from err
    return upgrade_keys(state_dict, meta.model.family), meta


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint '{path}' is a folder, not a file.",
            hint=f"Pass a .safetensors file, e.g. {path / 'best.safetensors'}.",
        )
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint '{path}' does not exist.",
            hint="Check the path; runs write best.safetensors and last.safetensors "
            "in their run folder.",
        )
    return path


def load_state_into(model: nn.Module, state_dict: dict[str, Tensor], *, source: str) -> None:
    """Strictly load `state_dict` into `model`, or raise a CheckpointError listing every
    missing key, unexpected key and shape mismatch (the first few by name, with counts)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (model {tuple(v.shape)}, checkpoint {tuple(state_dict[k].shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        _listing(f"{len(names)} {what}", names)
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"Weights from '{source}' do not fit the model: " + "; ".join(problems) + ".",
            hint="The checkpoint was saved from a different architecture; check its model spec "
            "with `crosskd inspect FILE`.",
        )
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return f"{title}: {shown}{more}"
