"""Evaluator: restores committed checkpoints and appends metrics to eval/results.jsonl.

Modules: ``probes`` (interpretability probe math), ``metrics`` (losses and probes of one
model), ``results`` (crash-safe results.jsonl), ``evaluator`` (the checkpoint loop).
This package never imports tensorflow, seqio or tfds.
"""
