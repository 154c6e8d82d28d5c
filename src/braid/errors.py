"""User-facing errors.

A `BraidError` is a mistake the user can fix (a bad config value, a missing file, a bad layout).
The CLI prints its message on one line and exits with code 2; everything else is a bug and keeps
its traceback.
"""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


class BraidError(Exception):
    """An error caused by user input; its message is one line that says what to change."""


class ConfigError(BraidError):
    """A config key is unknown, has the wrong type, or is inconsistent with another key."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config {key}={value!r}: {allowed}")


class DataError(BraidError):
    """Training data is missing, empty, corrupt or inconsistent with the model."""


def describe_os_error(e: OSError, path: object, doing: str) -> str:
    """One line for an OSError the user can fix: what was being done where, the reason, and for
    a full disk the free space left there."""
    import errno
    import shutil
    from pathlib import Path

    reason = e.strerror or type(e).__name__
    hint = ""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = ": make it writable or choose another location"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(str(path))
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free / 2**20
            hint = f" ({free:.0f} MiB free there): free some space or choose another location"
        except OSError:
            hint = ": free some space or choose another location"
    return f"cannot {doing} {path}: {reason}{hint}"


class StorageError(BraidError):
    """A file or directory could not be written or read (permissions, a full disk)."""

    def __init__(self, e: OSError, path: object, doing: str):
        super().__init__(describe_os_error(e, path, doing))
