"""JAX's persistent compilation cache, on by default for the trainer and the evaluator.

Compiled programs are kept in ``$XDG_CACHE_HOME/repeat_scaling/jax`` (default
``~/.cache/repeat_scaling/jax``), so a run that restarts, resumes or shares its shapes
with an earlier run loads its programs instead of compiling them again. Where:
``--compilation_cache=DIR``, else ``$REPEAT_SCALING_COMPILATION_CACHE``, else JAX's own
``$JAX_COMPILATION_CACHE_DIR``, else the default; ``off`` (flag or variable) turns it
off. A program is cached when it took at least
``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (JAX's default 1 s) to compile.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags

from repeat_scaling import workdir_io

ENV = "REPEAT_SCALING_COMPILATION_CACHE"
OFF = "off"

flags.DEFINE_string(
    "compilation_cache",
    None,
    f"Directory of JAX's persistent compilation cache ('{OFF}': none; default: ${ENV}, "
    "else $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/repeat_scaling/jax).",
)


def default_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/repeat_scaling/jax`` (``~/.cache`` when the variable is unset)."""
    return workdir_io.user_cache_dir() / "jax"


def directory(setting: str | None = None) -> str | None:
    """The cache directory the setting, the environment and the default choose (None: off)."""
    for value in (setting, os.environ.get(ENV), os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is not None and value != "":
            return None if value == OFF else os.path.abspath(os.path.expanduser(value))
    return str(default_dir())


def configure(setting: str | None = None) -> str | None:
    """Point JAX at the cache (``setting``, default the ``--compilation_cache`` flag).

    Call before the first compilation. Returns the directory, or None when off.
    """
    import jax

    if setting is None and flags.FLAGS.is_parsed():
        setting = flags.FLAGS.compilation_cache
    path = directory(setting)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
