"""The root of every error a user can act on. The CLI prints these as one line."""

from __future__ import annotations


class SprbotError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""
