"""The data facts of one run, built by one function: its token store, objective and plan.

:func:`build` is what the trainer (its validated config), the evaluator (the run's
recorded ``config.json`` as an ``ml_collections.ConfigDict``) and, for the objective
alone, the compile check (:func:`make_objective`, no store needed) call. Nothing here
prepares a store: preparing a missing ``data.store`` from ``data.source`` is
:func:`repeat_scaling.prepare.ensure_store`, an explicit step of the trainer's setup that
the evaluator never takes.

Token units in a run's records:

- *model tokens*: positions the model processes per example,
  ``objective.tokens_per_example`` (row lengths summed over the model's sequences:
  encoder + decoder for encoder-decoder objectives);
  :func:`tokens_per_step` is that x the global batch. ``derived.tokens_per_step``,
  ``derived.total_tokens`` and ``tokens_seen`` count these.
- *store tokens*: tokens of the token store an example is cut from,
  ``objective.raw_length`` (= ``plan.chunk_length``). ``data_plan.json`` and
  ``unique_tokens_seen`` / ``repeated_tokens_seen``
  (:meth:`~repeat_scaling.data.repetition.RepetitionPlan.tokens_seen`) count these.

The two differ whenever an objective does not feed the model the chunk as it is (span
corruption, prefix LM, encoder-decoder objectives).
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

from repeat_scaling import workdir_io
from repeat_scaling.data import pipeline
from repeat_scaling.data.objectives import MANIFEST_OBJECTIVES, Objective
from repeat_scaling.data.repetition import RepetitionPlan
from repeat_scaling.data.store import TokenStore


class RunDataError(ValueError):
    """A run's data settings that cannot be used (one line; the trainer reports it as a
    ``ConfigError``)."""


class RunData(NamedTuple):
    """The data of a run: ``store, objective, plan = build(...)``."""

    store: TokenStore
    objective: Objective
    plan: RepetitionPlan


def store_path(data: Any) -> pathlib.Path:
    """``data.store`` as a local path (a URL is a one-line ``WorkdirError``: stores are
    memory-mapped)."""
    return workdir_io.require_local(data.store, "data.store")


def open_store(path: str | pathlib.Path) -> TokenStore:
    """The prepared token store at ``path``, its shards verified against the manifest
    (sizes, and sha256 once per host and shard modification)."""
    store = TokenStore(str(path))
    store.verify()
    return store


def objective_options(data: Any, arch: str) -> dict[str, Any]:
    """Keyword options of ``pipeline.make_objective`` from the ``data`` config."""
    opts: dict[str, Any] = {"pack": bool(data.pack)}
    if arch == "encoder_decoder":
        opts["inputs_length"] = int(data.inputs_length)
        if data.targets_length:
            opts["targets_length"] = int(data.targets_length)
    else:
        opts["length"] = int(data.length)
    if data.objective in ("span_corruption",):
        opts["noise_density"] = float(data.noise_density)
        opts["mean_noise_span_length"] = float(data.mean_noise_span_length)
    opts.update(dict(data.objective_options))
    return opts


def recorded_objective_options(config: Any) -> dict[str, Any] | None:
    """The objective options a trainer resolved and recorded (``derived.objective.options``
    of a run's ``config.json``); None for a config that holds none (a new run, or a record
    written before the trainer recorded them)."""
    derived = config.get("derived") or {}
    recorded = derived.get("objective") or {}
    options = recorded.get("options")
    return dict(options) if options is not None else None


def objective_record(data: Any, arch: str, objective: Objective) -> dict[str, Any]:
    """What the trainer resolved of its objective, recorded once as ``derived.objective``:
    ``name``, ``options`` (keyword options of ``pipeline.make_objective``; the evaluator
    builds its objective from these), ``tokens_per_example`` (model tokens) and
    ``raw_length`` (store tokens per example)."""
    return {
        "name": str(data.objective),
        "options": objective_options(data, arch),
        "tokens_per_example": int(objective.tokens_per_example),
        "raw_length": int(objective.raw_length),
    }


def plan_record(data: RunData, total_model_tokens: int) -> dict[str, Any]:
    """``data_plan.json``: the plan's exact accounting (``RepetitionPlan.summary``, store
    tokens) plus the objective's ``tokens_per_example`` (model tokens) and
    ``raw_tokens_per_chunk``."""
    summary = dict(data.plan.summary())
    summary.setdefault("tokens_per_example", int(data.objective.tokens_per_example))
    summary.setdefault("raw_tokens_per_chunk", int(data.objective.raw_length))
    summary.setdefault("total_tokens", int(total_model_tokens))
    return summary


def plan_differences(plan: RepetitionPlan, recorded: dict[str, Any]) -> list[str]:
    """``"key: recorded vs rebuilt"`` for each accounting entry of ``recorded`` (a run's
    ``data_plan.json``) that the plan rebuilt from its config does not reproduce."""
    rebuilt = plan.summary()
    return [
        f"{key}: {recorded[key]!r} (recorded) vs {value!r} (rebuilt)"
        for key, value in rebuilt.items()
        if key in recorded and recorded[key] != value
    ]


def make_objective(
    data: Any,
    vocab: Any,
    arch: str,
    manifest: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Objective:
    """``data.objective`` with its options (``options`` when given, e.g. a run's recorded
    ones, else :func:`objective_options`); the objectives of ``MANIFEST_OBJECTIVES`` read
    the store's ``manifest``. ValueError/KeyError (one line) for bad options."""
    options = dict(objective_options(data, arch) if options is None else options)
    if data.objective in MANIFEST_OBJECTIVES and manifest is not None:
        options["store_manifest"] = manifest
    return pipeline.make_objective(data.objective, vocab, arch, **options)


def make_plan(
    config: Any, split: Any, objective: Objective, steps: int | None = None
) -> RepetitionPlan:
    """The repetition plan of ``config`` over ``split``: ``train.steps`` (or ``steps``)
    global batches of ``train.batch_size``, ``data.repeated_fraction`` /
    ``data.repeated_epochs``, seeded by ``seed``."""
    d = config.data
    return pipeline.build_plan(
        split,
        objective,
        int(config.train.steps if steps is None else steps),
        int(config.train.batch_size),
        float(d.repeated_fraction),
        int(d.repeated_epochs),
        int(config.seed),
    )


def build(config: Any, model_cfg: Any, store: TokenStore) -> RunData:
    """The run's data over an opened ``store``: the store's vocabulary checked against
    ``model_cfg.vocab_size``, the objective (for ``model_cfg.arch``; with the recorded
    options of a run's ``config.json`` when it has them) and the plan.

    Raises RunDataError for a vocabulary the model does not cover; ValueError/KeyError
    subclasses of the objective and the plan (a corpus too small, ...) pass through.
    """
    vocab = store.vocab
    if vocab.vocab_size > model_cfg.vocab_size:
        raise RunDataError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the store's vocabulary "
            f"({vocab.vocab_size} ids in {config.data.store})"
        )
    objective = make_objective(
        config.data, vocab, model_cfg.arch, store.manifest, recorded_objective_options(config)
    )
    plan = make_plan(config, store.split("train"), objective)
    return RunData(store, objective, plan)


def lengths_of(objective: Objective, arch: str) -> dict[str, int]:
    """Sequence lengths by stack (``encoder``, ``decoder``) for ``models.sizes``."""
    fl = objective.feature_lengths
    if arch == "encoder_decoder":
        return {
            "encoder": int(fl["encoder_input_tokens"]),
            "decoder": int(fl["decoder_target_tokens"]),
        }
    return {"decoder": int(fl["decoder_target_tokens"])}


def tokens_per_step(objective: Objective, batch_size: int) -> int:
    """Model tokens of one global batch: ``tokens_per_example`` x ``batch_size``."""
    return int(objective.tokens_per_example) * int(batch_size)
