"""``python -m repeat_scaling.evaluate --workdir=DIR [--watch] [--eval_config=...]``.

A thin entry point: the evaluator lives in :mod:`repeat_scaling.eval` (see
``repeat_scaling/eval/__main__.py`` for the flags).
"""

from repeat_scaling.eval.__main__ import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
