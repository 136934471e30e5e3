"""UL2 denoisers: the ``Denoiser`` record (R/X span corruption, S prefix LM), the default
mixture, validation of a denoiser list, and the mode (paradigm) tokens ``[NLU]``, ``[NLG]``,
``[S2S]`` as the three lowest extra ids. Shared by the native objectives and the seqio tasks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from repeat_scaling.data.features import ObjectiveError
from repeat_scaling.data.span_corruption import _check_span_params
from repeat_scaling.data.vocab import VocabInfo

MODE_TOKENS = {"R": 0, "X": 1, "S": 2}  # offset from the lowest extra id upwards
NUM_MODE_TOKENS = 3
#: The UL2 paper's paradigm token of each denoiser kind (the mode token's meaning).
PARADIGMS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


def mode_token_id(vocab: VocabInfo, name: str) -> int:
    """The UL2 mode (paradigm) token of denoiser kind ``name`` (R, X or S): one extra id.

    R (``[NLU]``), X (``[NLG]``) and S (``[S2S]``) are the three lowest extra ids, in that
    order (byte vocabulary: 259, 260, 261), so sentinels (counting down from the top) never
    reach them while at most ``extra_ids - 3`` are used. The one definition of the scheme:
    the native objectives and the seqio UL2 tasks (``data/seqio_tasks.py``) both use it.
    """
    if name not in MODE_TOKENS:
        raise ObjectiveError(f"unknown denoiser name {name!r}; expected one of 'R', 'S', 'X'")
    if vocab.extra_ids < NUM_MODE_TOKENS + 1:
        raise ObjectiveError(
            f"ul2 needs >= {NUM_MODE_TOKENS + 1} extra ids, vocab has {vocab.extra_ids}"
        )
    return vocab.sentinel(vocab.extra_ids - 1 - MODE_TOKENS[name])


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser (or the single denoiser of span_corruption / prefix_lm).

    name: "R" or "X" (span corruption) or "S" (prefix LM); ``rate`` is its mixture weight
    (normalised over the list). S draws the continuation length uniformly from
    ``[1, round(2 * target_fraction * L)]`` (mean ~ ``target_fraction``, capped at L-1).
    """

    name: str
    rate: float = 1.0
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    target_fraction: float = 0.25
    mode_token: bool = True

    @property
    def is_span(self) -> bool:
        return self.name in ("R", "X")

    def describe(self) -> str:
        if self.is_span:
            return f"{self.name}(density={self.noise_density}, span={self.mean_noise_span_length})"
        return f"S(target_fraction={self.target_fraction})"


def default_ul2_denoisers() -> list[dict[str, Any]]:
    """REFERENCE.md section 3 mixture; 1/3 each of R, S, X (split evenly inside R and X)."""
    return [
        {"name": "R", "noise_density": 0.15, "mean_noise_span_length": 3.0, "rate": 1 / 6},
        {"name": "R", "noise_density": 0.15, "mean_noise_span_length": 8.0, "rate": 1 / 6},
        {"name": "S", "target_fraction": 0.25, "rate": 1 / 3},
        {"name": "X", "noise_density": 0.5, "mean_noise_span_length": 3.0, "rate": 1 / 12},
        {"name": "X", "noise_density": 0.5, "mean_noise_span_length": 8.0, "rate": 1 / 12},
        {"name": "X", "noise_density": 0.15, "mean_noise_span_length": 64.0, "rate": 1 / 12},
        {"name": "X", "noise_density": 0.5, "mean_noise_span_length": 64.0, "rate": 1 / 12},
    ]


def parse_denoisers(specs: Sequence[dict[str, Any] | Denoiser]) -> list[Denoiser]:
    """Validate a denoiser list (dicts with ``name`` in R/S/X and optional fields)."""
    if not specs:
        raise ObjectiveError("denoisers list is empty; expected at least one of R, S, X")
    fields = {f.name for f in dataclasses.fields(Denoiser)} - {"mode_token"}
    out = []
    for spec in specs:
        if isinstance(spec, Denoiser):
            spec = dataclasses.asdict(spec)
            spec.pop("mode_token")
        if not isinstance(spec, dict) or "name" not in spec:
            raise ObjectiveError(f"denoiser {spec!r} must be a dict with a 'name' of R, S or X")
        if spec["name"] not in MODE_TOKENS:
            raise ObjectiveError(
                f"unknown denoiser name {spec['name']!r}; expected one of 'R', 'S', 'X'"
            )
        unknown = set(spec) - fields
        if unknown:
            raise ObjectiveError(
                f"unknown denoiser fields {sorted(unknown)}; expected {sorted(fields)}"
            )
        d = Denoiser(**spec)
        if not (d.rate > 0 and math.isfinite(d.rate)):
            raise ObjectiveError(f"denoiser {d.describe()} rate={d.rate!r} must be > 0")
        if d.is_span:
            _check_span_params(d.noise_density, d.mean_noise_span_length)
        elif not 0 < d.target_fraction <= 0.5:
            raise ObjectiveError(
                f"S denoiser target_fraction={d.target_fraction!r} must be in (0, 0.5]"
            )
        out.append(d)
    return out
