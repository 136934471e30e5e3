"""The evaluator: restore every committed checkpoint of a run and record its metrics.

One pass (default) evaluates every committed checkpoint not yet in
``workdir/eval/results.jsonl``, oldest first. ``watch=True`` keeps polling for new
checkpoints until the run's final step (``config.train.steps``) is recorded. Checkpoints
are listed with ``train.checkpointing.committed_steps`` (orbax's finalized step
directories), which only reports committed steps, never one still being written. A step that the trainer
deletes (keep-N retention) between listing and restoring is reported and skipped.

Only the model parameters are restored (``train.checkpointing.restore_params``), onto
the evaluator's own mesh (``num_devices`` devices on the "data" axis), whatever mesh the
run was trained on.

Token accounting per record (units):

- ``tokens_seen``: MODEL tokens (``derived.tokens_per_step`` x step, the trainer's
  unit: encoder + decoder tokens for T5).
- ``unique_tokens_seen`` / ``repeated_tokens_seen``: STORE tokens (chunks of
  ``objective.raw_length``) of the unique / repeated pool consumed by the first
  ``step * batch_size`` slots (``RepetitionPlan.tokens_seen``, as the trainer logs them).

The run's store, objective and plan come from ``data.run_data.build`` with the recorded
config (the trainer's own builder); the evaluator never prepares a store.

Stores with a task (the store manifest says which):

- ``"pairs"`` (a text-to-text task, ``prepare --task=...``): every record gains
  ``downstream_em`` / ``downstream_f1`` / ``downstream_accuracy`` / ``downstream_examples``
  (and ``downstream_samples``) from greedy-decoded answers of the first
  ``DownstreamSettings.examples`` examples of the validation split
  (:mod:`repeat_scaling.eval.downstream`). The metrics defined on plain running text
  (:data:`PLAIN_TEXT_METRICS`: the k-copies loss on document openings, loss by position
  and the ICL score over a full context) are null for such stores: their "documents"
  are prompt + answer + padding, not text.
  Decoding does not apply attention clamps: for a run trained with
  ``config.interventions`` the downstream metrics describe the unclamped model. The
  evaluator then logs a one-line warning and every record carries
  ``downstream_unclamped: true`` (``false`` for runs without clamps, or when no example
  was decoded).
- ``"icl_task"`` (the in-context-learning lab's synthetic sequences, vocabulary kind
  ``tokens``): every metric above is recorded as usual (the probes use random token ids
  of the store's own vocabulary, no text form needed) and the keys of
  ``repeat_scaling.eval.icl.icl_metrics(model, model_cfg, store, settings,
  interventions=, step=)`` are merged into the record. For a run trained with attention
  clamps (``config.interventions``) the probes measure the model's own attention (no
  clamp), while ``icl_metrics`` gets the clamps active at the checkpoint's step and
  evaluates the model as trained (it also reports the unclamped accuracy).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from repeat_scaling import run_files, sharding, workdir_io
from repeat_scaling.data import pipeline, run_data
from repeat_scaling.data.store import TokenStore
from repeat_scaling.errors import first_line
from repeat_scaling.eval import downstream, metrics, probes
from repeat_scaling.eval import tensorboard as eval_tensorboard
from repeat_scaling.eval.features import Lengths
from repeat_scaling.eval.results import ResultsWriter
from repeat_scaling.eval.runner import ModelRunner
from repeat_scaling.eval.settings import EvalSettings
from repeat_scaling.models.config import ModelConfig
from repeat_scaling.train import checkpointing, record


class EvalError(ValueError):
    """A workdir or evaluation setting that cannot be used (one-line message)."""


# Record keys that need plain running text; null for a pairs (text-to-text task) store.
# (metrics.evaluate_model still runs them, on a few rows: one shared code path for every
# store, at a cost that is small next to decoding the downstream examples.)
PLAIN_TEXT_METRICS = (
    "copy_loss",
    "copy_repeats_used",
    "copy_passage_length",
    "loss_by_position",
    "icl_score",
    "icl_positions",
)


#: Committed checkpoint steps of a workdir (``train.checkpointing.committed_steps``).
committed_steps = checkpointing.committed_steps


@dataclasses.dataclass
class Run:
    """What the evaluator needs to know about a training run."""

    workdir: pathlib.Path
    config: dict[str, Any]
    model_cfg: ModelConfig
    store: TokenStore
    objective: Any
    plan: Any
    lengths: Lengths
    final_step: int
    batch_size: int
    tokens_per_step: int

    @classmethod
    def load(cls, workdir: str | pathlib.Path) -> Run:
        workdir = workdir_io.workdir_path(workdir)
        path = workdir / run_files.CONFIG
        if not path.is_file():
            raise EvalError(f"{path} not found: --workdir={workdir} is not a training workdir")
        try:
            config = record.effective_config(
                run_files.load_json(path), record.read_resume_log(workdir)
            )
            model_cfg = ModelConfig.from_dict(config["model"])
            store_name, train = str(config["data"]["store"]), config["train"]
        except (run_files.RunFileError, KeyError, TypeError) as e:
            raise EvalError(f"{path} is not a resolved training config ({e})") from None
        store = run_data.open_store(_store_path(store_name, workdir, path))
        data = run_data.build(ml_collections.ConfigDict(config), model_cfg, store)
        _check_plan(workdir, data.plan)
        derived = config.get("derived", {})
        tps = int(
            derived.get("tokens_per_step")
            or run_data.tokens_per_step(data.objective, train["batch_size"])
        )
        return cls(
            workdir=workdir,
            config=config,
            model_cfg=model_cfg,
            store=store,
            objective=data.objective,
            plan=data.plan,
            lengths=Lengths.of(model_cfg, data.objective.feature_lengths),
            final_step=int(train["steps"]),
            batch_size=int(train["batch_size"]),
            tokens_per_step=tps,
        )

    def accounting(self, step: int) -> dict[str, int]:
        """Tokens seen after ``step`` updates (units in the module docstring)."""
        slots = min(step * self.batch_size, self.plan.num_slots)
        return {"tokens_seen": int(step) * self.tokens_per_step, **self.plan.tokens_seen(slots)}


def _check_plan(workdir: pathlib.Path, plan: Any) -> None:
    """The plan rebuilt from the run's config must reproduce the trainer's
    ``data_plan.json`` (when the run has one); EvalError naming the first difference."""
    path = workdir / run_files.DATA_PLAN
    recorded = run_files.read_json(path)
    if not isinstance(recorded, dict):
        return
    diffs = run_data.plan_differences(plan, recorded)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise EvalError(
            f"{path} does not match the plan rebuilt from {run_files.CONFIG}: {diffs[0]}{more}; "
            "the run's data would be misreported"
        )


def _store_path(store: str, workdir: Any, config_path: Any) -> pathlib.Path:
    """The local token store a run's ``data.store`` names (``record.find_store``;
    EvalError, one line)."""
    try:
        found, tried = record.find_store(workdir, store)
    except workdir_io.WorkdirError as e:
        raise EvalError(f"{e} (in {config_path})") from None
    if found is not None:
        return found
    if workdir_io.is_url(workdir) and not pathlib.Path(store).is_absolute():
        raise EvalError(
            f"data.store={store!r} in {config_path} is relative and not found from the "
            f"current directory {pathlib.Path.cwd()}; the gs:// workdir cannot hold the "
            "token store (memory-mapped): run from the directory the trainer ran from, or "
            "give an absolute local path"
        )
    raise EvalError(
        f"data.store={store!r} in {config_path} is not a token store here (no manifest.json "
        f"in {', '.join(map(str, tried))})"
    )


def wait_for_run(
    workdir: str | pathlib.Path, poll_seconds: float = 10.0, timeout_seconds: float = 0.0
) -> None:
    """Block until ``workdir/config.json`` exists (the trainer writes it once its data is
    ready); ``timeout_seconds`` > 0 bounds the wait (EvalError)."""
    path = workdir_io.workdir_path(workdir) / run_files.CONFIG
    start = time.monotonic()
    while not path.is_file():
        if timeout_seconds and time.monotonic() - start > timeout_seconds:
            raise EvalError(f"--watch timed out after {timeout_seconds:.0f} s waiting for {path}")
        logging.info("waiting for %s", path)
        time.sleep(poll_seconds)


def recorded_settings(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The ``eval`` block of the run's config.json (evaluator settings the experiment
    chose; ``--eval_config`` overrides them); {} when absent or unreadable."""
    recorded = run_files.read_json(workdir_io.workdir_path(workdir) / run_files.CONFIG)
    block = (recorded or {}).get("eval")
    return dict(block) if isinstance(block, dict) else {}


def eval_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """A data-parallel mesh over the first ``num_devices`` devices (0 = all)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise EvalError(f"num_devices={num_devices}; expected 0 (all) to {len(devices)}")
    devices = devices[: num_devices or len(devices)]
    return sharding.make_mesh({"data": -1}, devices=devices)


class Evaluator:
    """Evaluates the checkpoints of one run into ``workdir/eval/results.jsonl``."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        settings: EvalSettings | None = None,
        mesh: jax.sharding.Mesh | None = None,
        warn: Callable[[str], None] | None = None,
        downstream_settings: downstream.DownstreamSettings | None = None,
    ):
        self.warn = warn or logging.warning
        self.settings = settings or EvalSettings()
        self.downstream_settings = downstream_settings or downstream.DownstreamSettings()
        self.run = Run.load(workdir)
        manifest = self.run.store.manifest
        try:
            self.pairs = downstream.pairs_layout(manifest)
            if self.pairs is not None and self.downstream_settings.examples > 0:
                downstream.check_split(self.run.store, self.downstream_settings)
        except downstream.DownstreamError as e:
            raise EvalError(str(e)) from None
        self.icl_task = manifest.get("icl_task")
        clamps = self.run.config.get("interventions") or ()
        #: Downstream answers are decoded without the run's attention clamps.
        self.downstream_unclamped = bool(
            self.pairs is not None and clamps and self.downstream_settings.examples > 0
        )
        if self.downstream_unclamped:
            self.warn(
                f"{self.run.workdir} was trained with {len(clamps)} attention clamp(s) "
                "(config.interventions) but decoding ignores them: downstream_* metrics "
                "describe the unclamped model (records carry downstream_unclamped=true)"
            )
        self.mesh = mesh if mesh is not None else eval_mesh(0)
        self.writer = ResultsWriter(workdir, warn=self.warn)
        # TensorBoard scalars of results recorded before their event files existed.
        eval_tensorboard.write_missing(workdir, self.writer.records)
        #: Steps of this process that could not be evaluated, with the reason.
        self.failed: dict[int, str] = {}
        self._data: dict[str, Any] | None = None
        self._runner: ModelRunner | None = None
        self._generator: downstream.Generator | None = None

    # -- data shared by every checkpoint ------------------------------------------------
    def data(self) -> dict[str, Any]:
        if self._data is not None:
            return self._data
        s, run = self.settings, self.run
        train, heldout = run.store.split("train"), run.store.split("validation")
        vocab = run.store.vocab
        counts = probes.token_counts(train, vocab.vocab_size, s.frequency_tokens)
        special = [vocab.pad_id, vocab.eos_id, vocab.unk_id] + [
            vocab.sentinel(k) for k in range(vocab.extra_ids)
        ]
        candidates = probes.probe_candidates(counts, special, s.probe_exclude_fraction)
        raw = run.objective.raw_length
        available = heldout.num_tokens // raw
        if available < 1:
            raise EvalError(
                f"validation split has {heldout.num_tokens} tokens, fewer than one example "
                f"({raw} tokens)"
            )
        bs = min(s.batch_size, available)
        n_batches = max(1, min(s.test_batches, available // bs))
        test = pipeline.heldout_batches(heldout, run.objective, bs, n_batches, s.seed)
        # A subset seen once (f = 1, E = 1: the same chunks as f = 0) is unique data.
        rep = run.plan.repeated_chunks() if run.plan.epochs > 1 else np.zeros(0, np.int64)
        task = None
        if self.pairs is not None and self.downstream_settings.examples > 0:
            try:
                task = downstream.DownstreamTask(
                    run.store, self.downstream_settings, encoder_length=run.lengths.encoder
                )
            except downstream.DownstreamError as e:
                raise EvalError(str(e)) from None
        self._data = {
            "downstream": task,
            "train": train,
            "heldout": heldout,
            "candidates": candidates,
            "test_batches": test,
            "repeated_chunks": self._subsample(rep),
        }
        return self._data

    def _subsample(self, chunk_ids: np.ndarray) -> np.ndarray:
        n = self.settings.memorisation_examples
        if chunk_ids.size <= n:
            return chunk_ids
        rng = np.random.default_rng([self.settings.seed, 0xAB])
        return np.sort(rng.choice(chunk_ids, size=n, replace=False))

    def _seen_once(self, consumed: int) -> np.ndarray:
        """A sample of the chunks of the first ``consumed`` slots of an E = 1 plan (each
        seen exactly once, whichever pool the plan filed it under)."""
        n = min(self.settings.memorisation_examples, consumed)
        rng = np.random.default_rng([self.settings.seed, 0xAB])
        slots = np.sort(rng.choice(consumed, size=n, replace=False))
        return np.sort(self.run.plan.chunks(slots)[0])

    def _chunk_batches(self, chunk_ids: np.ndarray) -> list[dict] | None:
        if chunk_ids.size == 0:
            return None
        return pipeline.chunk_batches(
            self.data()["train"],
            chunk_ids,
            self.run.objective,
            self.settings.batch_size,
            self.settings.seed,
        )

    # -- one checkpoint -----------------------------------------------------------------
    def restore(self, step: int):
        """``(model, step)`` with the parameters of checkpoint ``step`` on the eval mesh."""
        try:
            model, _, step = checkpointing.restore_params(
                self.run.workdir, step, self.mesh, model_config=self.run.model_cfg
            )
        except checkpointing.CheckpointError as e:
            raise EvalError(str(e)) from None
        return model, step

    def evaluate_step(self, step: int) -> dict[str, Any] | None:
        """Evaluate checkpoint ``step`` and append its record; None if it was deleted."""
        t0 = time.perf_counter()
        try:
            model, step = self.restore(step)
        except (EvalError, FileNotFoundError, OSError) as e:
            if step not in committed_steps(self.run.workdir):
                self.warn(f"checkpoint step {step} was deleted before evaluation; skipped")
                return None
            return self._failed(step, first_line(e))
        d = self.data()
        run = self.run
        consumed = min(step * run.batch_size, run.plan.num_slots)
        if run.plan.epochs == 1 and run.plan.num_repeated:
            unique = self._seen_once(consumed)
        else:
            unique = self._subsample(run.plan.unique_seen_chunks(consumed))
        if self._runner is None:
            self._runner = ModelRunner(model, run.model_cfg, self.mesh)
        else:
            self._runner.load(model)  # same graph: the compiled functions are reused
        runner = self._runner
        rec: dict[str, Any] = {"step": int(step)}
        rec.update(run.accounting(step))
        rec.update(
            metrics.evaluate_model(
                runner,
                model,
                run.model_cfg,
                run.lengths,
                test_batches=d["test_batches"],
                repeated_batches=self._chunk_batches(d["repeated_chunks"]),
                unique_seen_batches=self._chunk_batches(unique),
                heldout=d["heldout"],
                candidates=d["candidates"],
                settings=self.settings,
                vocab_size=run.store.vocab.vocab_size,
            )
        )
        rec.update(self.task_metrics(model, step))
        rec.update(
            {
                "model": run.model_cfg.name,
                "arch": run.model_cfg.arch,
                "objective": run.config["data"]["objective"],
                "num_devices": int(self.mesh.devices.size),
                "eval_time_s": time.perf_counter() - t0,
            }
        )
        loss = rec.get("test_loss")
        if loss is None or not np.isfinite(loss):
            return self._failed(step, f"test_loss={loss} is not a finite number")
        if self.writer.append(rec):
            eval_tensorboard.write_step(run.workdir, rec)
        logging.info(
            "step %d: test_loss %.4f, prefix_matching %s (%.1f s)",
            step,
            rec["test_loss"] if rec["test_loss"] is not None else float("nan"),
            rec["prefix_matching"],
            rec["eval_time_s"],
        )
        if rec.get("downstream_examples"):
            logging.info(
                "step %d: downstream EM %.4f, F1 %.4f, accuracy %.4f on %d examples",
                step,
                rec["downstream_em"],
                rec["downstream_f1"],
                rec["downstream_accuracy"],
                rec["downstream_examples"],
            )
        return rec

    def _failed(self, step: int, message: str) -> None:
        """Record that ``step`` could not be evaluated; it stays pending (retried)."""
        self.writer.record_error(step, message)
        self.failed[int(step)] = message
        self.warn(
            f"step {step} not evaluated: {message} (recorded in {run_files.EVAL_ERRORS}; "
            "retried on the next pass)"
        )
        return None

    def task_metrics(self, model, step: int) -> dict[str, Any]:
        """The store's task metrics of checkpoint ``step`` (module docstring)."""
        out: dict[str, Any] = {}
        d = self.data()
        if self.pairs is not None:
            out.update(dict.fromkeys(PLAIN_TEXT_METRICS))
            task = d["downstream"]
            if task is None:  # downstream_examples=0
                out.update(dict.fromkeys(downstream.RECORD_KEYS))
            else:
                if self._generator is None:
                    vocab = self.run.store.vocab
                    self._generator = downstream.Generator(
                        self._runner, eos_id=vocab.eos_id, vocab_size=vocab.vocab_size
                    )
                prefix_lm = "decoder_causal_attention" in d["test_batches"][0]
                out.update(task.evaluate(self._generator, prefix_lm=prefix_lm))
            out["downstream_unclamped"] = self.downstream_unclamped
        if self.icl_task is not None:
            from repeat_scaling.eval.icl import icl_metrics

            out.update(
                icl_metrics(
                    model,
                    self.run.model_cfg,
                    self.run.store,
                    self.settings,
                    interventions=self.run.config.get("interventions") or None,
                    step=int(step),
                )
            )
        return out

    # -- the loop -------------------------------------------------------------------------
    def pending(self) -> list[int]:
        return [s for s in committed_steps(self.run.workdir) if not self.writer.done(s)]

    def run_all(
        self, watch: bool = False, poll_seconds: float = 10.0, timeout_seconds: float = 0.0
    ) -> list[dict[str, Any]]:
        """Evaluate pending checkpoints (and, with ``watch``, wait for new ones until the
        final step is recorded or ``timeout_seconds`` > 0 elapse). Returns new records."""
        start = time.monotonic()
        written: list[dict[str, Any]] = []
        if not watch and not committed_steps(self.run.workdir):
            raise EvalError(
                f"no committed checkpoint in {checkpointing.checkpoint_dir(self.run.workdir)}"
            )
        while True:
            self.failed = {}
            for step in self.pending():
                rec = self.evaluate_step(step)
                if rec is not None:
                    written.append(rec)
            if not watch and self.failed:
                first = min(self.failed)
                raise EvalError(
                    f"{len(self.failed)} checkpoint(s) not evaluated ({len(written)} were): "
                    f"step {first}: {self.failed[first]} (recorded in {run_files.EVAL_ERRORS}; "
                    "rerun to retry)"
                )
            if not watch or self.writer.done(self.run.final_step):
                return written
            if timeout_seconds and time.monotonic() - start > timeout_seconds:
                raise EvalError(
                    f"--watch timed out after {timeout_seconds:.0f} s before the final step "
                    f"{self.run.final_step} was checkpointed"
                )
            time.sleep(poll_seconds)
