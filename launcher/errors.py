"""The one exception type for user mistakes: the CLI prints it and exits 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the job file, the arguments or the inputs, with what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
