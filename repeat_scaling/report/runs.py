"""Load run directories written by the trainer and the evaluator.

A run directory (DESIGN.md, "Workdir layout") holds:

- ``config.json``: the resolved config (``model``, ``data``, ``train``, ``derived``);
- ``data_plan.json``: the exact repetition accounting (``requested``/``realised``
  repeated fraction and epochs, token totals);
- ``eval/results.jsonl``: one JSON object per evaluated checkpoint (``step``,
  ``tokens_seen``, ``test_loss``, probe scores, ...);
- ``train/metrics.jsonl``: one JSON object per logged training step;
- ``init_from.json`` (fine-tuned runs only): where the run's parameters came from
  (``path`` of the source workdir, ``kind`` "run" or "huggingface", ``step``,
  ``model`` and ``source_config``: the source run's config ``data`` block); the same
  object may instead sit under ``config.json`` ``derived.init_from``.

Nothing here is fatal: a missing file, a corrupt JSON line or a non-numeric metric is
recorded as a problem on the run (a one-line message naming the file and line) and the
report goes on with what exists. A run is *finished* when its results contain a line
whose ``step`` equals ``train.steps``.

Units: token counts are tokens (not sequences); parameter counts are parameters;
losses are mean per-token cross-entropies in nats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from repeat_scaling import run_files, workdir_io
from repeat_scaling.data import repetition
from repeat_scaling.train import record

# Which parameter count stands for "model size" N (Kaplan/Hernandez use non-embedding).
PARAM_KEYS = ("non_embedding", "total", "trainable")

STATUS_FINISHED = "finished"
STATUS_TRAINING = "training"
STATUS_NOT_EVALUATED = "not evaluated"
STATUS_MISSING = "missing"


# What a run's identity (what was trained) leaves out of config.json: the recorded sweep,
# derived facts, and keys that change how a run is watched, not what it learns.
NOT_IDENTITY = (
    "sweep",
    "derived",
    "eval",
    "mesh",
    "init_step",
    "data.store",
    "data.prefetch",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.keep_period",
    "train.async_checkpointing",
    "train.progress_bar",
    "train.profile_start_step",
    "train.profile_steps",
    "train.eval_every",
    "train.eval_batches",
    "train.peak_tflops",
    "train.steps_per_call",
    "model.scan_unroll",
)
# The sweep axes of the papers' figures.
SEED = ("seed",)
REPETITION = ("data.repeated_fraction", "data.repeated_epochs")
# What makes one model size differ from another (kept apart by the size fits).
MODEL_SIZE = (
    "model.name",
    "model.d_model",
    "model.d_ff",
    "model.num_heads",
    "model.head_dim",
    "model.num_encoder_layers",
    "model.num_decoder_layers",
    "train.optimizer.learning_rate",
)
# Family keys: an E sweep (runs alike but for E and the seed), and a repetition family
# (alike but for f, E and the seed: a repeated setting and its f = 0 baseline).
E_SWEEP = REPETITION[1:] + SEED
ACROSS_REPETITION = REPETITION + SEED
DROPOUT = ("model.dropout_rate", "train.dropout_start_step")
# Regularisers a repeated run is compared across (Xue et al.): effective sizes measure a
# regularised run against the unregularised baselines.
REGULARISATION = DROPOUT + ("model.droppath_rate", "train.label_smoothing")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value} (lists become tuples)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(map(repr, v)) if isinstance(v, list) else v
    return out


def _dropped(key: str, drop: Sequence[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in drop)


class ReportError(ValueError):
    """Bad input to the report (one-line message naming the bad value)."""


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, null, NaN, non-numeric)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _read_json(path: str, problems: list[str]) -> dict | None:
    """Read a JSON object file; on failure record a problem and return None."""
    if not workdir_io.exists(path):
        problems.append(f"{path}: file missing")
        return None
    try:
        with workdir_io.open_text(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{path}: unreadable JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object, got {type(data).__name__}")
        return None
    return data


def read_jsonl(path: str, problems: list[str]) -> list[dict]:
    """Read a JSON-lines file of objects, skipping (and reporting) corrupt lines.

    Lines are returned sorted by ``step``; when a step occurs more than once (e.g. an
    evaluator restarted mid-write) the last occurrence wins. Lines without an integer
    ``step`` are reported and skipped.
    """
    if not workdir_io.exists(path):
        return []
    by_step: dict[int, dict] = {}
    with workdir_io.open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path} line {lineno}: corrupt JSON line skipped ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path} line {lineno}: expected a JSON object, skipped")
                continue
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int | float) or step != int(step):
                problems.append(f"{path} line {lineno}: missing or non-integer 'step', skipped")
                continue
            by_step[int(step)] = row
    return [by_step[s] for s in sorted(by_step)]


@dataclasses.dataclass
class Run:
    """One run directory and everything the report knows about it."""

    path: str
    config: dict | None = None
    data_plan: dict | None = None
    results: list[dict] = dataclasses.field(default_factory=list)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    param_key: str = "non_embedding"
    init_from: dict | None = None  # init_from.json of a fine-tuned run, else None
    #: resume_log.jsonl: settings changed on resume (applied to ``config``)
    resume_log: list[dict] = dataclasses.field(default_factory=list)

    # ----- identity -------------------------------------------------------------------
    def identity(self, drop: Sequence[str] = ()) -> tuple:
        """What was trained, as a hashable key: config.json minus ``NOT_IDENTITY``
        and minus ``drop`` (dotted keys or prefixes). Runs with equal identities under
        ``drop`` = (sweep axis, seed) form one family. A run with nothing repeated counts
        as E = 1 whatever its recorded E."""
        flat = flatten(self.config or {})
        flat["data.repeated_fraction"] = self.repeated_fraction
        flat["data.repeated_epochs"] = self.repeated_epochs
        return tuple(
            sorted(
                (k, repr(v))
                for k, v in flat.items()
                if not _dropped(k, NOT_IDENTITY) and not _dropped(k, drop)
            )
        )

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def _section(self, key: str) -> dict:
        value = (self.config or {}).get(key)
        return value if isinstance(value, dict) else {}

    @property
    def model(self) -> str:
        return str(self._section("model").get("name") or "unknown")

    @property
    def arch(self) -> str:
        return str(self._section("model").get("arch") or "unknown")

    @property
    def objective(self) -> str:
        return str(self._section("data").get("objective") or "unknown")

    @property
    def seed(self) -> int | None:
        seed = (self.config or {}).get("seed")
        return seed if isinstance(seed, int) else None

    @property
    def params(self) -> float | None:
        """Model size N: ``derived.params[param_key]``, falling back to ``total``."""
        counts = self._section("derived").get("params")
        if isinstance(counts, dict):
            for key in (self.param_key, "total"):
                value = _finite(counts.get(key))
                if value is not None and value > 0:
                    return value
        elif _finite(counts) is not None:
            return _finite(counts)
        return None

    @property
    def steps(self) -> int | None:
        steps = _finite(self._section("train").get("steps"))
        return int(steps) if steps is not None else None

    @property
    def total_tokens(self) -> float | None:
        """Training token budget T: ``derived.total_tokens`` (model tokens), else, for a
        run without it, ``data_plan.json``'s ``total_tokens`` (store tokens)."""
        value = _finite(self._section("derived").get("total_tokens"))
        if value is None and self.data_plan:
            value = _finite(self.data_plan.get("total_tokens"))
        return value

    def _plan_value(self, key: str, sections=("requested", "realised")) -> float | None:
        """A plan value from the first of ``sections`` that has it, else config.data."""
        plan = self.data_plan or {}
        for section in sections:
            block = plan.get(section)
            if isinstance(block, dict) and _finite(block.get(key)) is not None:
                return _finite(block.get(key))
        return _finite(self._section("data").get(key))

    @property
    def repeated_fraction(self) -> float:
        """f as requested (0 = unique): the label runs are grouped and plotted by."""
        value = self._plan_value("repeated_fraction")
        return 0.0 if value is None else value

    @property
    def realised_fraction(self) -> float:
        """f as realised by the plan (whole chunks), used in token accounting."""
        value = self._plan_value("repeated_fraction", ("realised", "requested"))
        return 0.0 if value is None else value

    @property
    def repeated_epochs(self) -> float:
        """E: epochs on the repeated subset (1 when nothing is repeated)."""
        value = self._plan_value("repeated_epochs")
        return repetition.effective_epochs(self.repeated_fraction, 1.0 if value is None else value)

    @property
    def unique_tokens(self) -> float | None:
        """U_D: distinct training tokens, in the same units as ``total_tokens``.

        T x ``repetition.distinct_share``: the plan's exact accounting when present
        (unique pool + repeated subset over all planned store tokens, scaled to model
        tokens), else (1-f)*T + f*T/E.
        """
        total = self.total_tokens
        if total is None:
            return None
        plan = self.data_plan or {}
        share = repetition.distinct_share(
            self.realised_fraction,
            self.repeated_epochs,
            *(_finite(plan.get(k)) for k in ("unique_tokens", "subset_tokens", "total_tokens")),
        )
        return total * share

    @property
    def regularisation(self) -> str:
        """Short label of the regularisation/architecture variant (Xue et al. settings)."""
        model, train = self._section("model"), self._section("train")
        labels = []
        if (_finite(model.get("dropout_rate")) or 0) > 0:
            start = _finite(train.get("dropout_start_step")) or 0
            rate = _finite(model.get("dropout_rate"))
            labels.append(f"{'staged ' if start > 0 else ''}dropout {rate:g}")
        if (_finite(model.get("droppath_rate")) or 0) > 0:
            labels.append(f"droppath {_finite(model.get('droppath_rate')):g}")
        if (_finite(train.get("label_smoothing")) or 0) > 0:
            labels.append(f"label smoothing {_finite(train.get('label_smoothing')):g}")
        if (_finite(model.get("num_experts")) or 0) > 0:
            labels.append(f"MoE x{int(_finite(model.get('num_experts')))}")
        if model.get("param_share"):
            labels.append("ParamShare")
        return " + ".join(labels) if labels else "none"

    @property
    def setting(self) -> str:
        """Repetition setting label, e.g. ``f=0.1 E=100`` or ``unique``."""
        f = self.repeated_fraction
        return "unique" if f == 0 else f"f={f:g} E={self.repeated_epochs:g}"

    # ----- fine-tuning ----------------------------------------------------------------
    @property
    def data_key(self) -> str:
        """The training data's identity: ``data.store`` (normalised), else ``data.source``."""
        data = self._section("data")
        store = data.get("store")
        if isinstance(store, str) and store:
            return os.path.normpath(store)
        return str(data.get("source") or "unknown")

    @property
    def source_path(self) -> str | None:
        """Workdir (or Hugging Face directory) a fine-tuned run started from."""
        path = (self.init_from or {}).get("path")
        return str(path) if path else None

    @property
    def source_step(self) -> int | None:
        step = _finite((self.init_from or {}).get("step"))
        return int(step) if step is not None else None

    def _source_data(self, key: str) -> float | None:
        block = (self.init_from or {}).get("source_config")
        return _finite(block.get(key)) if isinstance(block, dict) else None

    @property
    def pretrain_setting(self) -> str:
        """Pre-training repetition label of a fine-tuned run (from init_from.json)."""
        if not self.init_from:
            return "from scratch"
        if self.init_from.get("kind") == "huggingface":
            return f"HF {os.path.basename(os.path.normpath(self.source_path or '?'))}"
        f = self._source_data("repeated_fraction")
        if f is None:
            return "pre-trained (setting unknown)"
        if f == 0:
            return "unique"
        e = self._source_data("repeated_epochs")
        return f"f={f:g} E={e:g}" if e is not None else f"f={f:g}"

    @property
    def pretrain_fraction(self) -> float | None:
        return self._source_data("repeated_fraction") if self.init_from else None

    @property
    def pretrain_epochs(self) -> float | None:
        if not self.init_from:
            return None
        return repetition.effective_epochs(
            self._source_data("repeated_fraction"), self._source_data("repeated_epochs")
        )

    # ----- progress -------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        return int(self.results[-1]["step"]) if self.results else None

    @property
    def status(self) -> str:
        if self.config is None:
            return STATUS_MISSING
        if not self.results:
            return STATUS_NOT_EVALUATED
        if self.steps is not None and any(int(r["step"]) == self.steps for r in self.results):
            return STATUS_FINISHED
        return STATUS_TRAINING

    @property
    def finished(self) -> bool:
        return self.status == STATUS_FINISHED

    def progress(self) -> str:
        """One-line human description of where the run is."""
        status = self.status
        if status == STATUS_TRAINING:
            return f"still training: last evaluated step {self.last_step} of {self.steps}"
        if status == STATUS_NOT_EVALUATED:
            return "no evaluation results yet"
        if status == STATUS_MISSING:
            return "no readable config.json (run missing or never started)"
        return f"finished at step {self.steps}"

    # ----- metrics --------------------------------------------------------------------
    def curve(self, key: str, x_key: str = "tokens_seen") -> tuple[list[float], list[float]]:
        """(x, y) over evaluated steps where both are finite; x falls back to step."""
        xs, ys = [], []
        for row in self.results:
            y = _finite(row.get(key))
            x = _finite(row.get(x_key))
            if x is None:
                x = _finite(row.get("step"))
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
        return xs, ys

    def final(self, key: str) -> float | None:
        """Metric at the final step (only when the run is finished)."""
        if not self.finished:
            return None
        for row in self.results:
            if int(row["step"]) == self.steps:
                return _finite(row.get(key))
        return None

    def latest(self, key: str) -> float | None:
        """Metric at the last evaluated step that has it."""
        for row in reversed(self.results):
            value = _finite(row.get(key))
            if value is not None:
                return value
        return None

    def chance(self, key: str) -> float | None:
        """The chance level of a probe score (what a head with no circuit scores), from
        the probe layout the evaluator recorded; None for metrics without one."""
        from repeat_scaling.eval import probes

        row = self.results[-1] if self.results else {}
        if key == "prefix_matching":
            period = _finite(row.get("probe_period")) or 25
            repeats = _finite(row.get("probe_repeats")) or 4
            return probes.prefix_matching_chance(int(period), int(repeats))
        if key == "copying_score":
            vocab = _finite(self._section("model").get("vocab_size"))
            return probes.copying_chance(int(vocab)) if vocab else None
        return None

    def best(self, key: str, higher_is_better: bool = False) -> float | None:
        """Best value over all evaluated steps (early-stopping / peak performance)."""
        _, ys = self.curve(key, x_key="step")
        if not ys:
            return None
        return max(ys) if higher_is_better else min(ys)


def _read_init_from(path: str, config: dict, problems: list[str]) -> dict | None:
    """A fine-tuned run's init_from.json, else config.json derived.init_from, else None."""
    file = os.path.join(path, run_files.INIT_FROM)
    if workdir_io.exists(file):
        return _read_json(file, problems)
    derived = config.get("derived")
    value = derived.get("init_from") if isinstance(derived, dict) else None
    return value if isinstance(value, dict) and value else None


def load_run(path: str, param_key: str = "non_embedding") -> Run:
    """Load one run directory; never raises for missing or corrupt files."""
    if param_key not in PARAM_KEYS:
        raise ReportError(f"param_key={param_key!r} is not one of {', '.join(PARAM_KEYS)}")
    run = Run(path=path, param_key=param_key)
    if not workdir_io.isdir(path):  # local or gs:// (repeat_scaling.workdir_io)
        run.problems.append(f"{path}: run directory missing")
        return run
    run.config = _read_json(os.path.join(path, run_files.CONFIG), run.problems)
    if run.config is None:
        return run
    run.resume_log = record.read_resume_log(path)
    run.config = record.effective_config(run.config, run.resume_log)
    plan_problems: list[str] = []
    run.data_plan = _read_json(os.path.join(path, run_files.DATA_PLAN), plan_problems)
    run.problems.extend(plan_problems)
    run.init_from = _read_init_from(path, run.config, run.problems)
    results_path = os.path.join(path, run_files.RESULTS)
    if not workdir_io.exists(results_path):
        run.problems.append(f"{results_path}: file missing (not evaluated yet)")
    run.results = read_jsonl(results_path, run.problems)
    run.metrics = read_jsonl(os.path.join(path, run_files.METRICS), run.problems)
    if run.params is None:
        run.problems.append(f"{path}/config.json: no derived.params count; fits skip this run")
    if run.steps is None:
        run.problems.append(f"{path}/config.json: no train.steps; cannot tell if finished")
    return run


def expand_patterns(patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """Expand glob patterns to run directories.

    Returns (directories, problems). A pattern without glob characters names a run
    directory that is kept even when absent (so it is reported as missing); a glob that
    matches nothing is reported. Non-directories matched by a glob are ignored.
    """
    dirs: list[str] = []
    problems: list[str] = []
    for pattern in patterns:
        if not any(c in pattern for c in "*?["):
            dirs.append(pattern)
            continue
        matches = workdir_io.glob_dirs(pattern)
        if not matches:
            problems.append(f"--runs pattern {pattern!r} matches no directory")
        dirs.extend(matches)
    seen: set[str] = set()
    unique = []
    for d in dirs:
        key = os.path.normpath(os.path.abspath(d))
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique, problems


def load_runs(
    patterns: Sequence[str], param_key: str = "non_embedding"
) -> tuple[list[Run], list[str]]:
    """Load every run directory matched by ``patterns``: (runs, global problems)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    dirs, problems = expand_patterns(patterns)
    return [load_run(d, param_key=param_key) for d in dirs], problems


def group(runs, drop: Sequence[str]) -> dict[tuple, list]:
    """Runs by :meth:`Run.identity` under ``drop`` (families), in first-seen order."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(r.identity(drop), []).append(r)
    return groups


def finals(runs, key: str) -> list[float]:
    """The final ``key`` of every finished run that has it."""
    return [x for x in (r.final(key) for r in runs) if x is not None]


def family_label(run, drop: Sequence[str], others: Sequence) -> str:
    """``model, objective, f=..`` plus every identity key in which ``run`` departs from
    the most common value among ``others`` (the runs it is shown beside)."""
    parts = [run.model, run.objective]
    if REPETITION[0] not in drop:
        parts.append(f"f={run.repeated_fraction:g}")
    mine = dict(run.identity(drop))
    theirs = [dict(other.identity(drop)) for other in others]
    # Shown already, or implied by the model name.
    skip = {"data.objective", *REPETITION, *MODEL_SIZE[:-1]}
    for k in sorted(set(mine) - skip):
        values = [t.get(k) for t in theirs]
        if len(set(values)) < 2:
            continue
        # Name a key only where this run departs from the most common value (first seen
        # on ties), so the plain family stays "model, objective, f".
        usual = max(dict.fromkeys(values), key=values.count)
        if mine[k] != usual:
            parts.append(f"{k.split('.')[-1]}={mine[k].strip(chr(39))}")
    return ", ".join(parts)
