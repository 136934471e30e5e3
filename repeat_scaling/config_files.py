"""Config files: ``path/to/x.py[:arg]`` -> the ConfigDict its ``get_config(arg)`` builds.

A config file is a Python module with ``get_config(arg)`` (ml_collections' convention:
the same files ``--config=`` takes). It imports what it reuses from the installed package
(``repeat_scaling.train.config``: ``default_config``, ``model_fields``, ``adamw``,
``adafactor_t5``; ``repeat_scaling.sweeps``: ``expand``, ``finetune_sweep``), so a config
in any directory works without editing ``sys.path``; another config file is reused with
:func:`load_module` (``load_module("configs/hernandez2022.py").get_config("cpu")``).
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
from typing import Any


class ConfigFileError(ValueError):
    """A config file that does not exist or does not load (one line)."""


def split(spec: str) -> tuple[str, str | None]:
    """``"configs/x.py:arg"`` -> ``("configs/x.py", "arg")``; no ``:arg`` -> ``(path, None)``."""
    path, sep, arg = str(spec).partition(".py:")
    if sep:
        return path + ".py", arg
    return str(spec), None


def load_module(path: str | pathlib.Path) -> types.ModuleType:
    """The config file at ``path`` as a fresh module (ConfigFileError, one line)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigFileError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_repeat_scaling_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigFileError(
            f"config file {str(path)!r}: line {e.lineno}: {e.msg} (not valid Python)"
        ) from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(f"config file {str(path)!r} defines no get_config()")
    return module


def load(spec: str) -> Any:
    """The config ``path.py[:arg]`` as its file builds it (no command-line overrides)."""
    path, arg = split(spec)
    module = load_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()
