"""The one exception type that the CLI turns into a one-line error message (no traceback)."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, settings that do not match."""


def kill_point(kind: str, count: int) -> None:
    """Fault injection for the reliability tests: with SDXL_LORA_KILL_AT="shards:3" (or "step:5") the
    process kills itself with SIGKILL right after the 3rd shard (5th optimizer step) is done, so a test
    can interrupt encode or train at an exact point. Unset, this does nothing."""
    import os
    import signal
    if os.environ.get("SDXL_LORA_KILL_AT") == f"{kind}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
