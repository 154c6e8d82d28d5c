"""User-facing errors.

A `BraidError` is a mistake the user can fix (a bad config value, a missing file, a bad layout).
The CLI prints its message on one line and exits with code 2; everything else is a bug and keeps
its traceback.
"""


class BraidError(Exception):
    """An error caused by user input; its message is one line that says what to change."""


class ConfigError(BraidError):
    """A config key is unknown, has the wrong type, or is inconsistent with another key."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config {key}={value!r}: {allowed}")


class DataError(BraidError):
    """Training data is missing, empty, corrupt or inconsistent with the model."""
