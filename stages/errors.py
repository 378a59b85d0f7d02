"""The one exception type that the CLI turns into a one-line error message (no traceback)."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, settings that do not match."""
