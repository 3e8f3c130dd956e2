"""Small file operations every writer shares: atomic replacement, durable renames, digests."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary file beside `path` for the caller to write whole, by any writer (safetensors,
    torch.export, ONNX, PIL, csv): when the block ends it replaces `path` in one rename; on an
    error it is removed. A reader never sees half a file and a crash leaves the previous one.

    The temporary name, `.NAME.<random>.tmpSUFFIX`, is unique (two writers never share one) and
    ends in the file's suffix (writers that infer the format from it). `durable`: its data
    reach the disk before the rename and the rename after it, so a power cut cannot leave an
    empty file in its place (checkpoints, records, the state marker); files that are only
    ever rewritten (pictures, results.csv) skip the two fsyncs. Permissions are a plain
    open()'s (the umask's), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # after writing: some writers create the file anew
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of earlier writes of `path` that a kill left behind (`atomic_path`'s
    names, and the `.NAME.<random>.tmp` of crosskd 0.2's checkpoints); only for a file that
    one writer at a time writes (the run folder's lock makes the others stale)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """`text` as the whole of `path`, written through `atomic_path`."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (POSIX only; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    """What a plain `open(..., "w")` would give: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
