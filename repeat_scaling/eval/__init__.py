"""Evaluator: restores committed checkpoints and appends metrics to eval/results.jsonl.

Modules: ``settings`` (``EvalSettings``), ``runner`` (the jitted model runner),
``features`` (hand-made evaluation sequences), ``probes`` (interpretability probe math),
``copying`` (the OV copying score from the weights), ``metrics`` (losses and probes of one
model), ``results`` (crash-safe results.jsonl), ``evaluator`` (the checkpoint loop).
This package never imports tensorflow, seqio or tfds.
"""
