"""Errors as one line: what every module re-raising or printing an error shows of it."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type name when the message is empty."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
