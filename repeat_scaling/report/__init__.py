"""Aggregate run directories into the papers' figures, CSVs and a Markdown report.

numpy / scipy / matplotlib only (no jax, no tensorflow): the report runs anywhere.
Entry point: ``python -m repeat_scaling.report --runs='DIR/*' --out=REPORT_DIR``.
"""
