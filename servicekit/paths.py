"""Paths named in requests: `~` expanded, without letting an odd name become a server error."""

from __future__ import annotations

from pathlib import Path


def user_path(text: str) -> Path:
    """`text` as a path with `~` / `~user` expanded; one whose home cannot be found ("~0", a user that does
    not exist) stays literal, so it is simply a path that is not there (NOT_FOUND), not a RuntimeError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)
