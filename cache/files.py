"""How every file of the project appears on disk: the one atomic-write helper, fsync and sha256.

A file is written under a temporary name unique to the writer (pid + random suffix, so two writers never
share one), flushed to disk, given the default mode (0666 less the umask, as any file the user creates:
libraries that write through mkstemp would leave 0600), renamed over its final name, and the folder's entry
is flushed too. A reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

TMP_SUFFIX = ".tmp"  # temporary files are `.<name>.<pid>-<random>.tmp`: hidden, and recognisable for clean-up


def default_mode(folder: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` to write; when the block ends without error, fsync it, give it the
    default mode and rename it over `path` (fsyncing the folder). On error the temporary file is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
