"""``python -m repeat_scaling.compile``: see ``repeat_scaling.compile.cli``."""

from repeat_scaling.compile.cli import run

if __name__ == "__main__":
    run()
