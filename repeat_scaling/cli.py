"""Command-line plumbing shared by the entry points: bad flags as one line.

absl and ``config_flags`` report a bad ``--config`` file or override (a typo in a key, a
value of the wrong type) as an exception whose text is a ``repr`` with escaped newlines,
sometimes a whole traceback. :func:`flag_error_line` turns it into one readable line;
:func:`parse_flags` is an ``app.run`` flags parser that prints it and exits 1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from absl import flags

#: What absl / ml_collections raise for a bad command line or config override.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _unwrap(text: str) -> str:
    """``text`` without one pair of matching quotes around all of it."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return text


def flag_error_line(error: BaseException) -> str:
    """One line from a flag-parsing error (the last line of a quoted traceback)."""
    text = _unwrap(str(error)).replace("\\n", "\n").replace("\\'", "'")
    lines = [_unwrap(line) for line in text.splitlines() if _unwrap(line)]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Traceback" in text else " ".join(lines)


def _config_file_error(flag, error: BaseException) -> str:
    """One line for a config file that does not load (missing, or broken Python)."""
    path = getattr(flag, "config_filename", "") or "?"
    cause = error.__cause__ or error
    if isinstance(cause, SyntaxError):
        return f"--{flag.name}={path}: line {cause.lineno}: {cause.msg} (not valid Python)"
    if "No such file" in str(error):
        return f"--{flag.name}={path}: no such config file"
    return f"--{flag.name}={path}: {flag_error_line(cause)}"


def print_error(msg: str) -> None:
    """The one line ``error: MSG`` on stderr: how every entry point reports bad input."""
    print(f"error: {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> NoReturn:
    """:func:`print_error`, then exit 1 (:func:`parse_flags` fails this way too)."""
    print_error(msg)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-file and override errors as one line (exit 1).

    ``config_flags`` loads a config file when its flag is parsed but reports a missing
    file only when the config is first used, and lets a syntax error escape as a
    traceback: both are turned into one line here, before anything runs.
    """
    try:
        rest = flags.FLAGS(argv)
    except SyntaxError as e:
        fail(f"config file {e.filename}: line {e.lineno}: {e.msg} (not valid Python)")
    except FLAG_ERRORS as e:
        fail(f"bad command line: {flag_error_line(e)}")
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if flag.present and hasattr(flag, "config_filename"):
            try:
                flag.value.keys()  # a config that failed to load raises here
            except (OSError, SyntaxError) as e:
                fail(_config_file_error(flag, e))
    return rest


# ----------------------------------------------------------------------------------
# Quiet logs
# ----------------------------------------------------------------------------------
flags.DEFINE_bool(
    "library_logs",
    False,
    "Also show the INFO lines of the libraries (orbax, jax, absl, ...) on stderr; by "
    "default only this project's INFO lines, and every warning and error.",
)

#: Where this project's own log lines come from: the package and the launchers.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = tuple(
    d + os.sep for d in (_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), "launch"))
)


class _OwnInfoOnly(logging.Filter):
    """Keeps warnings and errors, and INFO lines logged from this project's files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
            _OWN_DIRS
        )


def quiet_library_logs() -> None:
    """Unless ``--library_logs``: drop the libraries' INFO lines (orbax logs ~60 per
    checkpoint) from every handler of the root logger, absl's included. Call after the
    flags are parsed (``app.run`` installs absl's handler)."""
    if flags.FLAGS.library_logs:
        return
    from absl import logging as absl_logging

    handlers = set(logging.getLogger().handlers) | {absl_logging.get_absl_handler()}
    for handler in handlers:
        if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
            handler.addFilter(_OwnInfoOnly())
