"""User-facing errors: the CLI turns them into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix; the message names the bad value and the way out."""

    exit_code = 2


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest match of ``name`` among ``choices``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """An error for an unknown registry name, with the closest match and the valid list."""
    choices = sorted(choices)
    guess = closest(name, choices)
    hint = f"; did you mean '{guess}'?" if guess else ""
    return UserError(f"unknown {kind} '{name}'{hint} (choices: {', '.join(choices)})")
