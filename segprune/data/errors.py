"""Exception type raised by the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Invalid or unreadable input data, or an invalid data configuration.

    Subclasses :class:`ValueError` so generic callers can catch it. Every
    message names the offending file, folder or config key *and* the value
    that was found, so a user can fix the input without a debugger.
    """
