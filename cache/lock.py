"""An advisory lock on a folder that one process writes: a cache (`encode`) or an output folder (`train`).

    FOLDER/.sdxl-lora.lock   {"pid", "host", "started", "command"} of the writer that holds the folder

The lock file is created with O_CREAT|O_EXCL, so of two writers exactly one gets it; the other is refused with
one line naming the holder. It is removed when the writer ends, also on an error. A writer killed outright
(kill -9, a lost machine) leaves it behind: on the same host a lock whose process is no longer running is
stale and is taken over with a note; one written on another host is never broken automatically (the message
says how to remove it). Readers (`info`, `train` reading a cache) never take it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from cache.files import temporary_name
from cache.format import CacheError

LOCK_NAME = ".sdxl-lora.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_holder(path: Path) -> dict | None:
    """The lock file's JSON, {} if it is unreadable (its writer died between create and write), None if absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_stale(holder: dict) -> bool:
    """Written on this host by a process that is no longer running."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


class FolderLock:
    """`with FolderLock(folder, "encode").acquire(log):` holds `folder` (created if missing) until the block ends."""

    def __init__(self, folder: str | Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        self.created_folder = False

    def acquire(self, log=print) -> "FolderLock":
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is taken over at most a couple of times before giving up
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if not is_stale(holder):
                    self._remove_created_folder()
                    raise CacheError(self.refusal(holder))
                if self._break(holder):
                    log(f"note: {self.folder} was locked by {describe(holder)}, which is no longer running; "
                        "taking over its stale lock")
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.holder))
            return self
        self._remove_created_folder()
        raise CacheError(self.refusal(read_holder(self.path) or {}))

    def _break(self, stale: dict) -> bool:
        """Remove the stale lock `stale`, unless another writer replaced it meanwhile (then put that one back)."""
        aside = temporary_name(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved != stale:  # a live writer's lock, taken between our read and the rename: restore it
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return moved == stale

    def refusal(self, holder: dict) -> str:
        what = describe(holder) if holder else "another process (its lock file is unreadable)"
        return (f"{self.folder} is in use by {what}: only one {self.command} may write it at a time; wait for it "
                f"to finish, or if that process is gone, delete {self.path}")

    def release(self) -> None:
        if read_holder(self.path) == self.holder:  # never remove another writer's lock
            self.path.unlink(missing_ok=True)
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        """A folder the lock created and nothing else filled (a refused run) is removed again."""
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict) -> str:
    return (f"{holder.get('command', 'a process')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')})")


def lock_folder(folder: str | Path, command: str, log=print) -> FolderLock:
    """Take `folder`'s lock for `command` (encode, train), or raise CacheError naming the holder."""
    return FolderLock(folder, command).acquire(log)
