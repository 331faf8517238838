"""Dates given by people or systems: parsed once, refused as one-line user errors."""

from __future__ import annotations

import datetime as dt

from mlops.errors import UserError


def parse_date(value: str | dt.date, name: str) -> dt.date:
    """A YYYY-MM-DD date; anything else is a one-line user error naming ``name``."""
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise UserError(f"{name} {value!r} is not a date (use YYYY-MM-DD)") from None
