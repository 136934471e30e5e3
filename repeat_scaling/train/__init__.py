"""Sharded trainer: config, optimizers, state, compiled step, checkpoints, loop.

Entry point: ``python -m repeat_scaling.train --config=configs/x.py --workdir=DIR``.
The evaluator restores parameters with :func:`repeat_scaling.train.checkpointing.restore_params`.
"""
