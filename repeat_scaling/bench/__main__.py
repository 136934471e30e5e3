"""Dispatch `python -m repeat_scaling.bench NAME [flags...]` to `repeat_scaling.bench.NAME`.

Each benchmark module defines `main(argv: list[str]) -> None` and prints one JSON object
per measurement on stdout.
"""

import importlib
import pkgutil
import sys

import repeat_scaling.bench as _bench_pkg


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_bench_pkg.__path__) if m.name != "__main__")


def main() -> None:
    from repeat_scaling import host_malloc

    host_malloc.configure()  # before jax starts XLA's thread pools
    names = _available()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        got = sys.argv[1] if len(sys.argv) > 1 else "(nothing)"
        sys.exit(
            f"usage: python -m repeat_scaling.bench NAME [flags]; NAME={got!r}, expected one of {names}"
        )
    module = importlib.import_module(f"repeat_scaling.bench.{sys.argv[1]}")
    module.main([f"repeat_scaling.bench.{sys.argv[1]}"] + sys.argv[2:])


if __name__ == "__main__":
    main()
