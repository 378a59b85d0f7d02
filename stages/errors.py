"""The exception type that the CLI turns into a one-line error message (no traceback), the one-line messages of
every other expected failure (a full disk, a path that cannot be written, out of memory, an interruption), and
the fault-injection hook of the reliability tests. Torch-free: pipeline.py's error boundary imports it."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, settings that do not match."""


OUT_OF_MEMORY = {
    "train": "the GPU ran out of memory; settings that lower memory, most effective first: --gradient-checkpointing "
             "(on by default), --batch-size 1 with a larger --grad-accum, --mixed-precision fp16 or bf16 (not no), "
             "--optimizer adamw8bit, a lower --rank, or a cache encoded at a lower --resolution; checkpoints written "
             "so far are intact (--resume latest)",
    "encode": "out of memory: lower --batch-size (and --num-workers); completed shards are kept, rerun the same "
              "command to continue",
    "sample": "out of memory: lower --resolution, or render on a GPU with more memory (--device cuda)",
    "bench": "out of memory: this configuration does not fit; lower --batch-size or --resolution, or see --vram-budget",
}
OUT_OF_HOST_MEMORY = "the machine ran out of memory (RAM) during {command}: close other programs, lower --batch-size " \
                     "or --num-workers, or use a machine with more memory"
# What an OSError means for a user, by errno; {path} is the file or folder it names.
OS_ERRORS = {
    errno.ENOSPC: "disk full while writing {path}: free space and rerun the same command; {kept}",
    errno.EDQUOT: "disk quota exceeded while writing {path}: free space and rerun the same command; {kept}",
    errno.EACCES: "permission denied: {path}: choose a location you may write to (or read), or fix its permissions",
    errno.EPERM: "operation not permitted: {path}: choose a location you may write to, or fix its permissions",
    errno.EROFS: "read-only file system: {path}: choose a location on a writable disk",
    errno.ENOTDIR: "{path}: a part of this path is a file, not a folder",
    errno.EISDIR: "{path} is a folder where a file is needed",
    errno.EEXIST: "{path} already exists where a new folder is needed (a file?)",
    errno.ENOENT: "not found: {path} (deleted or moved while the command ran?)",
    errno.ENAMETOOLONG: "file name too long: {path}",
    errno.EIO: "input/output error on {path}: the disk (or network file system) failed; check it and rerun",
}
KEPT = {"encode": "completed shards are kept and the rerun continues after them",
        "train": "checkpoints written so far are intact (--resume latest continues from the newest)"}
SAFETENSORS_OS_ERROR = re.compile(r"Os \{ code: (\d+)")  # safetensors' Rust io::Error, e.g. StorageFull (28)


def clean(text: str) -> str:
    """A message without Python object reprs: PIL's `cannot identify image file <_io.BytesIO object at 0x7f…>`
    becomes `cannot identify image file`."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text)


def _os_error(e: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name) of the OSError behind `e`: e itself, its causes, or an error text of a library that
    wraps one (safetensors' SafetensorError `IoError(Os { code: 28, kind: StorageFull, ... })`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in OS_ERRORS:
            return e.errno, e.filename if isinstance(e.filename, (str, bytes, os.PathLike)) else None
        if (m := SAFETENSORS_OS_ERROR.search(str(e))) and int(m.group(1)) in OS_ERRORS:
            return int(m.group(1)), None
        if "No space left on device" in str(e):
            return errno.ENOSPC, None
        e = e.__cause__ or e.__context__
    return None


def _name_path(path: str, options: dict) -> str:
    """`path`, with the option that names it or the folder it lies in: `X (--output)`, or `X/f (in --output)`."""
    best = None  # (depth, flag, value) of the most specific option
    try:
        target = Path(path).resolve()
        for name, value in options.items():
            if isinstance(value, str) and value and not value.startswith("-"):
                folder = Path(value).resolve()
                if (target == folder or folder in target.parents) and (best is None or len(folder.parts) > best[0]):
                    best = (len(folder.parts), f"--{name.replace('_', '-')}", value, target == folder)
    except (OSError, ValueError):
        pass
    if best is None:
        return path
    return f"{path} ({best[1]})" if best[3] else f"{path} (in {best[1]})"


def failure_message(e: BaseException, command: str, options: dict) -> str | None:
    """The one line an expected failure of `command` ends in; None for anything else (a bug: its traceback shows).

    Expected: UserError and CacheError; an OSError (also one wrapped by a library) that means a full disk, a path
    that cannot be written or read, or a path of the wrong kind; out of GPU or host memory."""
    from cache.format import CacheError
    if isinstance(e, (UserError, CacheError)):
        return clean(str(e))
    if isinstance(e, MemoryError):
        return OUT_OF_HOST_MEMORY.format(command=command)
    if type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        return OUT_OF_MEMORY.get(command, OUT_OF_MEMORY["bench"])
    found = _os_error(e)
    if found is None:
        return None
    code, path = found
    path = os.fsdecode(path) if path is not None else None
    if path is None:  # a library's error without the file name: the command's output, where it has one
        path = next((options[k] for k in ("output", "cache", "out", "workdir") if options.get(k)), None)
    where = _name_path(path, options) if path else "the output"
    return OS_ERRORS[code].format(path=where, kept=KEPT.get(command, "no half-written file is left"))


def interrupted_message(command: str, options: dict) -> str:
    """What Ctrl-C leaves behind, and how to continue."""
    if command == "encode":
        return ("interrupted: the shards written so far are complete and kept; rerun the same command to continue "
                "from the last one")
    if command == "train":
        out = Path(options.get("output") or ".")
        steps = sorted(int(p.name.split("-", 1)[1]) for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit())
        if steps:
            return (f"interrupted: checkpoint-{steps[-1]} in {out} is intact; rerun the same command with --resume "
                    "latest to continue from it")
        return ("interrupted before the first checkpoint: rerun the same command to start again "
                "(--checkpoint-every N saves checkpoints that --resume latest continues from)")
    return "interrupted: files written so far are complete (every file appears whole); rerun the same command"


def kill_point(kind: str, count: int) -> None:
    """Fault injection for the reliability tests: with SDXL_LORA_KILL_AT="shards:3" (or "step:5") the
    process kills itself with SIGKILL right after the 3rd shard (5th optimizer step) is done, so a test
    can interrupt encode or train at an exact point. With SDXL_LORA_PAUSE_AT="step:1" and SDXL_LORA_PAUSE_FILE=F
    it writes F.paused there and waits until F exists, so a test can run a second process against a live one.
    Unset, this does nothing."""
    import signal
    import time
    if os.environ.get("SDXL_LORA_KILL_AT") == f"{kind}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SDXL_LORA_PAUSE_AT") == f"{kind}:{count}":
        gate = os.environ["SDXL_LORA_PAUSE_FILE"]
        open(gate + ".paused", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.05)
