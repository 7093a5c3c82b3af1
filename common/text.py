"""Small text helpers every component shares: an error's first line, and booleans from words."""

from __future__ import annotations

import argparse

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def first_line(exc: BaseException | None, limit: int = 300) -> str:
    """The first line of an error's message, at most `limit` characters, for logs and messages.

    A SQLAlchemy error's own text repeats the statement and its parameters; the driver's original
    error (`exc.orig`) is used instead when there is one. An error without a message gives its type.
    """
    if exc is None:
        return "unknown error"
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def parse_bool(value: object, *, empty: bool | None = None) -> bool:
    """A bool from a word: 1/0, true/false, yes/no, on/off (any case), or a bool itself.

    Args:
        value: the word.
        empty: what an empty word means; None refuses it.

    Raises:
        ValueError: the word is none of those.
    """
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    if lowered == "" and empty is not None:
        return empty
    raise ValueError(f"{value!r} is not a boolean (expected true/false, 1/0, yes/no, on/off)")


def cli_bool(text: str) -> bool:
    """argparse type for boolean options; an empty value (an unset MLproject parameter) is false."""
    try:
        return parse_bool(text, empty=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
