"""Benchmarks that print JSON lines: `python -m repeat_scaling.bench NAME [flags]`."""
