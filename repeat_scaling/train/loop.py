"""The training loop: validate, set up data/mesh/state, run the compiled step, log, save.

``train(config, workdir)`` is what ``python -m repeat_scaling.train`` runs. Order of
work (everything that can fail on bad input fails before anything is compiled):

1. validate the config (:mod:`repeat_scaling.train.config`) against the devices;
2. take the workdir's lock (``WORKDIR/train.lock``, :class:`~repeat_scaling.workdir_io.
   WorkdirLock`): one trainer per workdir; a second one stops at once with one line
   naming the holder; a stale lock (dead holder on this host, old heartbeat) is taken over;
3. open the token store (preparing it first when ``data.source`` is given and the store
   does not exist), build the objective and the repetition plan;
4. check ``init_from`` (fine-tuning, :mod:`repeat_scaling.train.init_from`) unless the
   workdir already has checkpoints (then it resumes, and a different ``init_from`` than
   the recorded one is an error);
5. a resume compares the resolved config with the recorded ``config.json``
   (:mod:`repeat_scaling.train.record`): a difference that changes what was trained is a
   one-line error naming each key, before anything is restored or overwritten;
6. create the state sharded, restore the latest committed checkpoint (the data
   position is the step number, so nothing else is needed to resume exactly), or, for a
   new fine-tuning run, restore the source parameters with a fresh optimizer state;
7. a new run writes its record (``config.json``: resolved config + ``derived``,
   ``data_plan.json`` and, when fine-tuning, ``init_from.json``), once; a resume appends
   the accepted changes to ``resume_log.jsonl``. A start that fails before its first
   checkpoint leaves no record (and no new empty workdir);
8. loop: batch(step) -> ``make_array_from_process_local_data`` -> step -> metrics;
   checkpoint every ``train.checkpoint_every`` steps, on SIGTERM and at the end;
   stop with :class:`NonFiniteLossError` on a NaN/Inf loss or gradient, without saving
   the bad state (the last good checkpoint stays the latest).

Attention clamps (``config.interventions``) act inside the compiled train step, keyed by
the traced step counter; the in-loop held-out eval runs the model without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import jax
import numpy as np
from absl import logging

from repeat_scaling import run_files, sharding, workdir_io
from repeat_scaling.data.objectives import MANIFEST_OBJECTIVES
from repeat_scaling.errors import first_line
from repeat_scaling.train import checkpointing, distributed, metrics, optimizers
from repeat_scaling.train import config as config_lib
from repeat_scaling.train import init_from as init_from_lib
from repeat_scaling.train import record as record_lib
from repeat_scaling.train import state as state_lib
from repeat_scaling.train import step as step_lib


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/Inf."""


class Preempted(RuntimeError):
    """SIGTERM received; a checkpoint was saved at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): saved checkpoint at step {step}; rerun to resume")
        self.step = step


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit() -> str | None:
    here = pathlib.Path(__file__).resolve().parent
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def open_store(data: Any):
    """Open ``data.store``; prepare it from ``data.source``/``data.vocab`` if missing."""
    from repeat_scaling.data.store import TokenStore

    path = workdir_io.require_local(data.store, "data.store")
    if not (path / "manifest.json").is_file():
        if not data.source:
            raise config_lib.ConfigError(
                f"data.store={str(path)!r} is not a prepared token store (no manifest.json) "
                "and no data.source is given to prepare it"
            )
        if not data.vocab:
            raise config_lib.ConfigError(f"data.source={data.source!r} needs data.vocab to prepare")
        vocab_file = os.path.expanduser(str(data.vocab))
        if vocab_file.endswith(".model") and not os.path.isfile(vocab_file):
            # before any work: a missing vocabulary file is one line, not a traceback
            raise config_lib.ConfigError(
                f"data.store={str(path)!r} is not prepared and cannot be built here: "
                f"data.vocab={data.vocab!r} does not exist (copy the prepared store to this "
                "path, or set data.vocab to the vocabulary file)"
            )
        if jax.process_index() == 0:
            from repeat_scaling.prepare import prepare_store

            prepare_store(data.source, data.vocab, str(path), **dict(data.prepare_options))
        distributed.sync("prepare_store")
    store = TokenStore(str(path))
    store.verify()  # shard sizes, and sha256 once per host and shard modification
    return store


def objective_options(config: Any, arch: str) -> dict[str, Any]:
    """Keyword options for ``pipeline.make_objective`` from ``config.data``."""
    d = config.data
    opts: dict[str, Any] = {"pack": bool(d.pack)}
    if arch == "encoder_decoder":
        opts["inputs_length"] = int(d.inputs_length)
        if d.targets_length:
            opts["targets_length"] = int(d.targets_length)
    else:
        opts["length"] = int(d.length)
    if d.objective in ("span_corruption",):
        opts["noise_density"] = float(d.noise_density)
        opts["mean_noise_span_length"] = float(d.mean_noise_span_length)
    opts.update(dict(d.objective_options))
    return opts


def build_data(config: Any, model_cfg: Any):
    """``(store, objective, plan)`` for a validated config."""
    from repeat_scaling.data import pipeline

    store = open_store(config.data)
    vocab = store.vocab
    if vocab.vocab_size > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the store's vocabulary "
            f"({vocab.vocab_size} ids in {config.data.store})"
        )
    options = objective_options(config, model_cfg.arch)
    if config.data.objective in MANIFEST_OBJECTIVES:
        options["store_manifest"] = store.manifest
    try:
        objective = pipeline.make_objective(config.data.objective, vocab, model_cfg.arch, **options)
        plan = pipeline.build_plan(
            store.split("train"),
            objective,
            int(config.train.steps),
            int(config.train.batch_size),
            float(config.data.repeated_fraction),
            int(config.data.repeated_epochs),
            int(config.seed),
        )
    except (ValueError, KeyError) as e:
        raise config_lib.ConfigError(first_line(e)) from None
    return store, objective, plan


def lengths_of(objective: Any, arch: str) -> dict[str, int]:
    fl = objective.feature_lengths
    if arch == "encoder_decoder":
        return {
            "encoder": int(fl["encoder_input_tokens"]),
            "decoder": int(fl["decoder_target_tokens"]),
        }
    return {"decoder": int(fl["decoder_target_tokens"])}


def derived_facts(config: Any, model_cfg: Any, objective: Any) -> dict[str, Any]:
    from repeat_scaling.models import sizes

    tokens_per_step = int(objective.tokens_per_example) * int(config.train.batch_size)
    return {
        "params": sizes.count_params(model_cfg),
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * int(config.train.steps),
        "flops_per_token": sizes.flops_per_token(model_cfg, lengths_of(objective, model_cfg.arch)),
        "feature_lengths": {k: int(v) for k, v in objective.feature_lengths.items()},
        "package_versions": package_versions(),
        "git_commit": git_commit(),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
    }


def resolved_config(config: Any, model_cfg: Any, derived: dict[str, Any]) -> dict[str, Any]:
    """The record of the run: the config with the model's fields, ``data.store`` as an
    absolute path (relative paths are taken from the working directory) and ``derived``."""
    d = config.to_dict()
    d["data"]["store"] = workdir_io.absolute_local(config.data.store, "data.store")
    d["model"] = model_cfg.to_dict()
    d["derived"] = derived
    return d


def to_global(batch: dict[str, np.ndarray], batch_sharding: Any) -> dict[str, jax.Array]:
    """This host's rows -> global sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in batch.items()
    }


def call_spans(start: int, stop: int, periods=(), marks=()) -> Iterator[tuple[int, int]]:
    """``(first step, steps)`` of each call from ``start`` to ``stop``: a call ends at the
    next multiple of any positive ``periods`` entry, at any of ``marks``, or at ``stop``.

    From any start that is a call end, the following calls are the same as an
    uninterrupted run's (checkpoints are written only at call ends)."""
    s = start
    while s < stop:
        ends = [stop] + [(s // p + 1) * p for p in periods if p > 0]
        end = min(ends + [m for m in marks if m > s])
        yield s, end - s
        s = end


# ----------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------
class _SigtermFlag:
    """Records SIGTERM (single process) for a save-and-exit at the next step boundary."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        if jax.process_count() == 1:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handler(self, signum, frame):
        self.received = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except (RuntimeError, ValueError):
                return False
        return self.received

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


# ----------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------
def train(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train to ``config.train.steps`` (resuming from ``workdir`` if it has checkpoints).

    Returns a summary dict (``final_step``, ``last_metrics``, ``resumed_from``).
    """
    workdir = workdir_io.workdir_path(workdir)  # absolute local path or gs:// epath
    model_cfg = config_lib.validate(
        config, num_devices=jax.device_count(), process_count=jax.process_count()
    )
    primary = jax.process_index() == 0
    created = isinstance(workdir, pathlib.Path) and not workdir.exists()
    lock = _take_lock(workdir) if primary else None
    wrote: list[Any] = []  # record files this start wrote (removed if nothing is committed)
    failed = True
    try:
        out = _train_locked(config, workdir, model_cfg, lock, wrote)
        failed = False
        return out
    finally:
        if failed and primary and not checkpointing.committed_steps(workdir):
            for path in wrote:  # a start that committed nothing leaves no record
                path.unlink(missing_ok=True)
        if lock is not None:
            lock.release()
        if failed and created and primary and not any(p.is_file() for p in workdir.rglob("*")):
            shutil.rmtree(workdir, ignore_errors=True)  # nor an empty new workdir


def _take_lock(workdir: Any) -> workdir_io.WorkdirLock:
    """The trainer's lock on ``workdir`` (one trainer per workdir), taken before anything
    is written; a live holder is a one-line :class:`~repeat_scaling.workdir_io.LockError`."""
    workdir_io.mkdirs(workdir)
    lock = workdir_io.workdir_lock(workdir / run_files.TRAIN_LOCK)
    try:
        lock.acquire()
    except workdir_io.LockError as e:
        raise workdir_io.LockError(
            f"another trainer is running in {workdir}: {e}; wait for it or stop it"
        ) from None
    if lock.took_over:
        logging.warning("%s", lock.took_over)
    return lock


def _last_logged(workdir: Any, step: int) -> dict[str, Any]:
    """The last record of ``train/metrics.jsonl`` at or before ``step`` ({} if none)."""
    text = workdir_io.read_text(workdir / run_files.METRICS, "") or ""
    last: dict[str, Any] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            last = rec
    return last


def _check_more_steps(
    config: Any, recorded: dict[str, Any], done: int, store: Any, objective: Any, plan: Any
) -> None:
    """A changed ``train.steps`` must keep the data and learning rates of the ``done``
    steps already trained (ConfigError naming what would change)."""
    from repeat_scaling.data import pipeline

    old_steps, new_steps = int(recorded["train"]["steps"]), int(config.train.steps)
    change = f"train.steps: {old_steps} (recorded) vs {new_steps} (now)"
    steps = np.arange(done)
    old_lr = optimizers.make_optimizer(config.train.optimizer, old_steps)[1]
    new_lr = optimizers.make_optimizer(config.train.optimizer, new_steps)[1]
    if done and not np.allclose(
        np.asarray(old_lr(steps)), np.asarray(new_lr(steps)), rtol=1e-6, atol=0
    ):
        raise config_lib.ConfigError(
            f"{change} changes the learning rates of the {done} steps already trained "
            "(the schedule decays over train.steps unless train.optimizer.decay_steps is "
            "set); use a new --workdir"
        )
    d = config.data
    old_plan = pipeline.build_plan(
        store.split("train"),
        objective,
        old_steps,
        int(config.train.batch_size),
        float(d.repeated_fraction),
        int(d.repeated_epochs),
        int(config.seed),
    )
    slots = np.arange(min(done * int(config.train.batch_size), old_plan.num_slots))
    if slots.size and not all(
        np.array_equal(a, b) for a, b in zip(old_plan.chunks(slots), plan.chunks(slots))
    ):
        raise config_lib.ConfigError(
            f"{change} changes the data of the {done} steps already trained (the repeated "
            "subset is a fraction of all training tokens); use a new --workdir"
        )


def _train_locked(
    config: Any, workdir: Any, model_cfg: Any, lock: Any, wrote: list[Any]
) -> dict[str, Any]:
    tc = config.train
    clamps = config_lib.interventions(config, model_cfg)
    store, objective, plan = build_data(config, model_cfg)
    # Fine-tuning source: checked before anything is written to the workdir.
    source = None
    init_from, init_step = str(config.get("init_from", "")), int(config.get("init_step", -1))
    committed = checkpointing.committed_steps(workdir)
    if committed:
        init_record = init_from_lib.check_resume(workdir, init_from, init_step)
    elif init_from:
        source = init_from_lib.resolve(init_from, init_step, model_cfg, store.vocab)
        init_record = source.record()
    else:
        init_record = None
    derived = derived_facts(config, model_cfg, objective)
    derived["steps_per_call"] = config_lib.steps_per_call(
        config, derived["tokens_per_step"] * derived["flops_per_token"]["train"]
    )
    derived["init_from"] = init_record
    derived["interventions"] = [
        dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in clamps
    ]
    resolved = resolved_config(config, model_cfg, derived)
    # The record: compared before anything is overwritten or restored.
    recorded = run_files.read_json(workdir / run_files.CONFIG) if committed else None
    if committed and recorded is None:
        raise config_lib.ConfigError(
            f"{workdir} has checkpoints {committed} but no readable {run_files.CONFIG}; "
            "it cannot be resumed safely"
        )
    changes = record_lib.check_resume(workdir, recorded, resolved) if recorded else []
    if any(k == "train.steps" for k, _, _ in changes):
        _check_more_steps(config, recorded, committed[-1], store, objective, plan)
    primary = jax.process_index() == 0

    dcn = {a: int(n) for a, n in dict(config.mesh.dcn).items()}
    mesh = sharding.make_mesh(
        dict(config.mesh.ici), dcn if any(n > 1 for n in dcn.values()) else None
    )
    rules = sharding.DEFAULT_RULES
    tx, schedule = optimizers.make_optimizer(tc.optimizer, int(tc.steps))
    info = state_lib.abstract_state(model_cfg, tx, mesh, rules)
    ckpt = checkpointing.Checkpointer(
        workdir,
        save_every=int(tc.checkpoint_every),
        keep=int(tc.keep),
        keep_period=int(tc.keep_period),
        async_save=bool(tc.async_checkpointing),
    )
    # The newest committed checkpoint that verifies (falling back past corrupt ones).
    state = ckpt.restore_latest_good(info.abstract, warn=lambda m: logging.warning("%s", m))
    if state is None and source is not None:
        params = source.load_params(model_cfg, info.abstract["params"], mesh, rules)
        state = state_lib.state_from_params(model_cfg, tx, info, params, int(config.seed), rules)
    elif state is None:
        state, _ = state_lib.create_train_state(model_cfg, tx, mesh, int(config.seed), rules)
    start = int(jax.device_get(state["step"]))
    if primary:
        if recorded is None:  # a new run (or one that committed nothing): its record
            if source is not None:
                run_files.write_json(workdir / run_files.INIT_FROM, init_record)
                wrote.append(workdir / run_files.INIT_FROM)
            run_files.write_json(workdir / run_files.CONFIG, resolved)
            wrote.append(workdir / run_files.CONFIG)
            summary = dict(plan.summary())
            summary.setdefault("tokens_per_example", int(objective.tokens_per_example))
            summary.setdefault("raw_tokens_per_chunk", int(objective.raw_length))
            summary.setdefault("total_tokens", derived["total_tokens"])
            run_files.write_json(workdir / run_files.DATA_PLAN, summary)
            wrote.append(workdir / run_files.DATA_PLAN)
        elif changes:
            record_lib.append_resume_log(workdir, start, changes)
    distributed.sync("workdir_written")
    steps_per_call = int(derived["steps_per_call"])
    step_fns = {
        n: step_lib.config_train_step(
            config,
            info,
            model_cfg,
            tx,
            schedule,
            rules=rules,
            interventions=clamps,
            steps_per_call=n,
        )
        for n in {1, steps_per_call}
    }  # each compiles on its first call
    eval_step = None
    heldout = []
    if tc.eval_every:
        from repeat_scaling.data import pipeline
        from repeat_scaling.data.batcher import BatcherError

        eval_step = step_lib.make_eval_step(info, model_cfg, rules)
        try:
            heldout = pipeline.heldout_batches(
                store.split("validation"),
                objective,
                int(tc.batch_size),
                int(tc.eval_batches),
                int(config.seed),
            )
        except BatcherError as e:
            raise config_lib.ConfigError(f"train.eval_batches={tc.eval_batches}: {e}") from None

    from repeat_scaling.data.batcher import Batcher

    total_steps = int(tc.steps)
    batcher = Batcher(
        store.split("train"),
        plan,
        objective,
        int(tc.batch_size),
        int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=int(config.data.prefetch),
    )
    batch_sh = sharding.batch_sharding(mesh, rules)
    stacked_sh = step_lib.stacked_sharding(batch_sh)
    units = metrics.hardware_units(
        jax.devices()[0].platform, jax.device_count(), jax.process_count()
    )
    peak = float(tc.peak_tflops) or metrics.lookup_peak_tflops(jax.devices()[0].device_kind)
    peak_total = peak * units if peak else None
    train_flops = float(derived["flops_per_token"]["train"])
    tokens_per_step = int(derived["tokens_per_step"])

    # Token accounting (store tokens of repeated / unique chunks) from the plan.
    B, L = int(tc.batch_size), int(objective.raw_length)
    repeated_seen = int(batcher.repeated_examples(0, start).sum())

    writer = metrics.MetricsWriter(
        workdir,
        total_steps=total_steps,
        start_step=start,
        is_primary=primary,
        progress_bar=str(tc.progress_bar),
    )
    log_every = int(tc.log_every)
    prof_start = int(tc.profile_start_step)
    prof_stop = prof_start + int(tc.profile_steps)
    profiling = False
    last: dict[str, Any] = {}
    # (first step, metrics on device (scalars, or [n] for n steps), time per step)
    pending: list[tuple[int, Any, float]] = []

    def drain(force: bool = False) -> None:
        """Fetch metrics of finished calls; check finiteness; write logged steps."""
        nonlocal last
        while pending and (force or len(pending) > 1):
            first, m, dt = pending.pop(0)
            fetched = {k: np.atleast_1d(v) for k, v in jax.device_get(m).items()}
            for i in range(len(fetched["loss"])):
                s = first + i
                host = {k: float(v[i]) for k, v in fetched.items()}
                if host["finite"] < 1.0:
                    raise NonFiniteLossError(
                        f"non-finite loss/gradient at step {s} (loss={host['loss']}, "
                        f"grad_norm={host['grad_norm']}); stopped without saving, "
                        f"last good checkpoint: {ckpt.latest_step()}"
                    )
                if s % log_every == 0 or s == total_steps:
                    record = {
                        "step": s,
                        "loss": host["loss"],
                        "accuracy": host["accuracy"],
                        "z_loss": host["z_loss"],
                        "aux_loss": host["aux_loss"],
                        "learning_rate": host["learning_rate"],
                        "grad_norm": host["grad_norm"],
                        "tokens_seen": s * tokens_per_step,
                        "unique_tokens_seen": seen_at[s][0],
                        "repeated_tokens_seen": seen_at[s][1],
                        "step_time_s": dt,
                        **metrics.throughput(dt, tokens_per_step, train_flops, peak_total),
                    }
                    writer.write(record)
                    last = record
                seen_at.pop(s, None)

    def spans():
        """Steps of each compiled call: ``steps_per_call`` at a time, cut at checkpoints,
        evals, the profile window and the end (the same cuts whatever the start step)."""
        marks = (prof_start, prof_stop) if prof_start >= 0 else ()
        periods = (steps_per_call, ckpt.save_every, int(tc.eval_every))
        return call_spans(start, total_steps, periods, marks)

    seen_at: dict[int, tuple[int, int]] = {}
    t_prev = time.perf_counter()
    try:
        with _SigtermFlag() as sigterm:
            it = batcher.iter_spans(spans())
            for call, (s, n) in enumerate(spans(), start + 1):
                if s == prof_start and primary:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    profiling = True
                rows = next(it)
                reps = repeated_seen + np.cumsum(batcher.repeated_examples(s, s + n))
                for i, r in enumerate(reps.tolist(), s + 1):
                    seen_at[i] = ((i * B - r) * L, r * L)
                repeated_seen = int(reps[-1])
                if n == steps_per_call > 1:
                    state, m = step_fns[n](state, to_global(rows, stacked_sh))
                    calls = [(s + 1, m)]
                else:  # one step per call (steps_per_call=1, or a span cut short)
                    calls = []
                    for i in range(n):
                        one = to_global({k: v[i] for k, v in rows.items()}, batch_sh)
                        state, m = step_fns[1](state, one)
                        calls.append((s + i + 1, m))
                done = s + n
                # Step time = time between dispatches / steps; drain() waits for the
                # previous call's metrics, so in the steady state this is device time.
                now = time.perf_counter()
                pending.extend((first, m, (now - t_prev) / n) for first, m in calls)
                t_prev = now
                drain()
                if profiling and done >= prof_stop:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                if eval_step is not None and done % int(tc.eval_every) == 0:
                    drain(force=True)
                    writer.write_eval(done, _evaluate(eval_step, state, heldout, batch_sh))
                due = ckpt.save_every and done % ckpt.save_every == 0
                # multi-host: the sync-point counter must advance by one per call
                stop = sigterm.should_stop(call if steps_per_call > 1 else done)
                if due or stop or done == total_steps:
                    drain(force=True)  # never checkpoint a state produced by a NaN step
                    if lock is not None and lock.lost:  # taken over while this one hung
                        lock.check()
                    ckpt.save(state, force=True)
                    writer.flush()  # gs://: metrics up to every checkpoint survive a kill
                if stop:
                    ckpt.wait()
                    raise Preempted(done)
            drain(force=True)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        batcher.close()
        writer.close()
        ckpt.close()
    if not last and primary:  # nothing left to train: report the last logged step
        last = _last_logged(workdir, start)
    return {"final_step": total_steps, "resumed_from": start, "last_metrics": last}


def _evaluate(eval_step, state, heldout, batch_sh) -> dict[str, float]:
    tot = {"loss_sum": 0.0, "correct": 0.0, "weight_sum": 0.0}
    pi, pc = jax.process_index(), jax.process_count()
    for b in heldout:
        rows = {k: v[pi * (len(v) // pc) : (pi + 1) * (len(v) // pc)] for k, v in b.items()}
        out = jax.device_get(eval_step(state["params"], state["extra"], to_global(rows, batch_sh)))
        for k in tot:
            tot[k] += float(out[k])
    w = max(tot["weight_sum"], 1.0)
    return {"loss": tot["loss_sum"] / w, "accuracy": tot["correct"] / w}


def main_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)
