"""Launching experiments: sweep expansion, backends (local, Cloud TPU, SLURM), status.

`launch/` is a plain directory of scripts (`python launch/submit.py ...`,
`python launch/status.py ...`) that is also importable as the package `launch` from
the repository root, so tests can call the same functions the scripts use.
"""
