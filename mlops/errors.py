"""Exception types. User errors print as one line and exit non-zero; none of them is retried."""

from __future__ import annotations

from typing import Any


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type name when it has none."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


class UserError(Exception):
    """Bad input from the person or system that started the run (exit code 2, no traceback)."""


class SourceError(UserError):
    """The source is missing, unreadable, incomplete or corrupt."""


class ValidationFailed(Exception):
    """The data failed validation badly enough that training must not run.

    Carries the validation report so callers can show or store why.
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and Prefect pickle exceptions between processes; keep the report on the way.
        return (type(self), (str(self), self.report))


class PromotionFailed(Exception):
    """A challenger could not be deployed or failed its health check; nothing was switched."""


class BackupError(UserError):
    """A backup or restore cannot proceed: unknown id, unreachable root, corrupt or missing file,
    or a target without space or permission. Nothing has been written when it is raised."""


class CheckFailed(Exception):
    """A maintenance check found a definite problem (not a transient error worth retrying)."""


NON_RETRYABLE: tuple[type[BaseException], ...] = (
    UserError,
    ValidationFailed,
    PromotionFailed,
    CheckFailed,
)
