"""The evaluator's settings: how many rows each metric reads and the probe layouts.

``EvalSettings`` comes from ``--eval_config`` (JSON or ``key=value,...``) or a run's
``config.eval``; the context-length rules that use it are in :mod:`repeat_scaling.eval.metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluator knobs (``--eval_config`` JSON or ``key=value,...`` overrides)."""

    batch_size: int = 8  # rows per evaluation batch (a multiple of the mesh's batch shards)
    test_batches: int = 4  # held-out batches for test loss/accuracy
    memorisation_examples: int = 32  # chunks for repeated_loss and unique_seen_loss each
    copy_repeats: int = 11  # k copies of a passage (Hernandez et al.)
    copy_min_passage: int = 16
    copy_examples: int = 8
    random_repeat_length: int = 0  # 0: half the context
    random_repeat_examples: int = 8
    icl_early: int = 50
    icl_late: int = 500
    icl_examples: int = 16
    probe_sequences: int = 10
    probe_period: int = 25
    probe_repeats: int = 4
    probe_exclude_fraction: float = 0.01
    previous_token_length: int = 128  # real-text window for the previous-token score
    frequency_tokens: int = 4_000_000  # train tokens counted for probe token frequencies
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "probe_exclude_fraction":
                if not 0.0 <= v < 0.5:
                    raise ValueError(f"eval_config {f.name}={v!r}; expected a fraction in [0, 0.5)")
            elif f.name in ("random_repeat_length", "seed"):
                if not isinstance(v, int) or v < 0:
                    raise ValueError(f"eval_config {f.name}={v!r}; expected an int >= 0")
            elif not isinstance(v, int) or v < 1:
                raise ValueError(f"eval_config {f.name}={v!r}; expected an int >= 1")
        if self.copy_repeats < 2:
            raise ValueError(f"eval_config copy_repeats={self.copy_repeats}; expected >= 2")

    @classmethod
    def from_overrides(cls, d: dict[str, Any]) -> EvalSettings:
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown eval_config key {unknown[0]!r}; known: {sorted(names)}")
        kw = {}
        for k, v in d.items():
            want = float if k == "probe_exclude_fraction" else int
            try:
                kw[k] = want(v) if not isinstance(v, bool) else v
            except (TypeError, ValueError):
                what = "a float" if want is float else "an int"
                raise ValueError(f"eval_config {k}={v!r}; expected {what}") from None
        return cls(**kw)
