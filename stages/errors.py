"""The one exception type that the CLI turns into a one-line error message (no traceback)."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, settings that do not match."""


def kill_point(kind: str, count: int) -> None:
    """Fault injection for the reliability tests: with SDXL_LORA_KILL_AT="shards:3" (or "step:5") the
    process kills itself with SIGKILL right after the 3rd shard (5th optimizer step) is done, so a test
    can interrupt encode or train at an exact point. With SDXL_LORA_PAUSE_AT="step:1" and SDXL_LORA_PAUSE_FILE=F
    it writes F.paused there and waits until F exists, so a test can run a second process against a live one.
    Unset, this does nothing."""
    import os
    import signal
    import time
    if os.environ.get("SDXL_LORA_KILL_AT") == f"{kind}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SDXL_LORA_PAUSE_AT") == f"{kind}:{count}":
        gate = os.environ["SDXL_LORA_PAUSE_FILE"]
        open(gate + ".paused", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.05)
