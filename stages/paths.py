"""Paths a command reads or writes, checked where they enter and before any model loads: there, of the right
kind (a folder or a file), writable; and whether an argument is a path at all or a hub id. Torch-free."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from stages.errors import UserError

# huggingface_hub's repo id form: `name` or `namespace/name`, letters, digits, `-`, `_`, `.` (no `--` or `..`)
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_path(value: str) -> bool:
    """True when `value` can only be, or most likely is, a local path rather than a hub id: it starts with `.`,
    `/` or `~`, is not of a hub id's form (two slashes, a backslash, `..`), or its first part is a folder here
    (`data/kohya` with a `data/` folder)."""
    if value.startswith((".", "/", "~")) or not HUB_ID.match(value) or "--" in value or ".." in value:
        return True
    return "/" in value and os.path.isdir(value.split("/", 1)[0])


def did_you_mean(path: str | Path) -> str:
    """' (did you mean X?)' naming the closest entry beside a path that is not there, else ''."""
    path = Path(path).expanduser()
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir() if p.name != path.name] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be created in `folder`, or None."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except OSError:
        pass
    return None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"


def _check_creatable(path: str, target: Path, flag: str) -> None:
    """Folder `target` (named by `path`, or holding it) can be created or written: its nearest existing ancestor (or
    itself) is a writable folder."""
    existing = _nearest_existing(target.absolute())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if why := _unwritable(existing):
        raise UserError(f"{flag} {path}: cannot write in {existing} ({why}): choose a folder you may write to")


def check_output_folder(path: str, flag: str, dry_run: bool = False) -> None:
    """A folder a command creates or writes into: refused when it is a file, lies under a file, or cannot be
    created or written (read-only, no permission). With `dry_run` (nothing is written) only its kind is checked."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder (new, or one the command wrote)")
    if not dry_run:
        _check_creatable(path, p, flag)
    elif not _nearest_existing(p.absolute()).is_dir():
        raise UserError(f"{flag} {path}: {_nearest_existing(p.absolute())} is a file, not a folder")


def check_output_file(path: str, flag: str) -> None:
    """A file a command writes: refused when it is a folder, or its folder cannot be created or written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file: give a file name")
    _check_creatable(path, p.parent, flag)


def check_input(path: str, flag: str, kind: str = "folder", what: str = "") -> Path:
    """A folder (kind "folder") or file (kind "file") a command reads: it must be there, be of that kind and be
    readable. `what` names it in the message (default: the kind)."""
    p = Path(path).expanduser()
    what = what or kind
    if not p.exists():
        raise UserError(f"{flag} {path}: {what} not found{did_you_mean(p)}")
    if kind == "folder" and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a {what}")
    if kind == "file" and p.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a {what}")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"{flag} {path}: permission denied (it cannot be read)")
    return p
