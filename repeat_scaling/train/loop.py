"""The training loop: validate, set up data/mesh/state, run the compiled step, log, save.

``train(config, workdir)`` is what ``python -m repeat_scaling.train`` runs. Order of
work (everything that can fail on bad input fails before anything is compiled):

1. validate the config (:mod:`repeat_scaling.train.config`) against the devices;
2. take the workdir's lock (``WORKDIR/train.lock``, :class:`~repeat_scaling.workdir_io.
   WorkdirLock`): one trainer per workdir; a second one stops at once with one line
   naming the holder; a stale lock (dead holder on this host, old heartbeat) is taken over;
3. prepare a missing token store from ``data.source`` (``prepare.ensure_store``, an
   explicit step), open it and build the objective and the repetition plan
   (``data.run_data.build``, the one builder the evaluator uses too);
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

Steps 3-7 are :func:`setup` (it returns a :class:`LoopSetup`), step 8 :func:`train_loop`.

Attention clamps (``config.interventions``) act inside the compiled train step, keyed by
the traced step counter; the in-loop held-out eval runs the model without them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import jax
import numpy as np
from absl import logging

from repeat_scaling import run_files, sharding, workdir_io
from repeat_scaling.data import run_data
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
def prepare_missing_store(data: Any) -> None:
    """Prepare a missing ``data.store`` from ``data.source`` (``prepare.ensure_store``):
    process 0 prepares, the others wait. ConfigError (one line) when it cannot."""
    from repeat_scaling import prepare

    try:
        if prepare.ensure_store(data, build=jax.process_index() == 0):
            distributed.sync("prepare_store")
    except run_data.RunDataError as e:
        raise config_lib.ConfigError(str(e)) from None


def open_data(config: Any, model_cfg: Any) -> run_data.RunData:
    """``(store, objective, plan)`` of a validated config over its prepared store:
    ``run_data.build`` (ConfigError, one line)."""
    store = run_data.open_store(run_data.store_path(config.data))
    try:
        return run_data.build(config, model_cfg, store)
    except (ValueError, KeyError) as e:
        raise config_lib.ConfigError(first_line(e)) from None


def derived_facts(config: Any, model_cfg: Any, objective: Any) -> dict[str, Any]:
    from repeat_scaling.models import sizes

    tokens_per_step = run_data.tokens_per_step(objective, config.train.batch_size)
    return {
        "params": sizes.count_params(model_cfg),
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * int(config.train.steps),
        "flops_per_token": sizes.flops_per_token(
            model_cfg, run_data.lengths_of(objective, model_cfg.arch)
        ),
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
        out = train_loop(config, workdir, lock, setup(config, workdir, model_cfg, wrote))
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
    old_plan = run_data.make_plan(config, store.split("train"), objective, steps=old_steps)
    slots = np.arange(min(done * int(config.train.batch_size), old_plan.num_slots))
    if slots.size and not all(
        np.array_equal(a, b) for a, b in zip(old_plan.chunks(slots), plan.chunks(slots))
    ):
        raise config_lib.ConfigError(
            f"{change} changes the data of the {done} steps already trained (the repeated "
            "subset is a fraction of all training tokens); use a new --workdir"
        )


# ----------------------------------------------------------------------------------
# Setup: steps 3-7 of the module docstring
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopSetup:
    """What the loop needs, made by :func:`setup`."""

    state: Any  # the train state at ``start`` (the loop takes it over)
    start: int  # the restored step
    ckpt: checkpointing.Checkpointer
    step_fns: dict[int, Any]  # steps per call -> train step (each compiles on first call)
    steps_per_call: int
    eval_step: Any  # the in-loop held-out eval step; None without train.eval_every
    heldout: list[dict[str, np.ndarray]]
    batcher: Any  # data.batcher.Batcher of this host's rows
    batch_sh: Any  # sharding of one step's batch
    stacked_sh: Any  # sharding of steps_per_call stacked batches
    writer: metrics.MetricsWriter
    tokens_per_step: int  # model tokens
    train_flops: float  # model FLOPs per token of a train step
    peak_total: float | None  # peak FLOP/s of all chips (MFU), None when unknown
    repeated_seen: int  # examples from repeated chunks in the steps before ``start``


def setup(config: Any, workdir: Any, model_cfg: Any, wrote: list[Any]) -> LoopSetup:
    """Data, fine-tuning source, record check, state and record (the module docstring's
    steps 3-7), then the step functions, held-out batches, batcher and metrics writer.

    Record files written are appended to ``wrote``.
    """
    tc = config.train
    clamps = config_lib.interventions(config, model_cfg)
    prepare_missing_store(config.data)
    data = open_data(config, model_cfg)
    committed = checkpointing.committed_steps(workdir)
    source, init_record = _init_source(config, workdir, model_cfg, data.store, committed)
    derived = _derived(config, model_cfg, data.objective, init_record, clamps)
    resolved = resolved_config(config, model_cfg, derived)
    recorded, changes = _compare_record(config, workdir, resolved, committed, data)

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
    state = _initial_state(config, model_cfg, ckpt, info, source, tx, mesh, rules)
    start = int(jax.device_get(state["step"]))
    if jax.process_index() == 0:
        if recorded is None:  # a new run (or one that committed nothing): its record
            _write_record(workdir, wrote, resolved, source, init_record, data)
        elif changes:
            record_lib.append_resume_log(workdir, start, changes)
    distributed.sync("workdir_written")
    steps_per_call = int(derived["steps_per_call"])
    step_fns = {  # each compiles on its first call
        n: step_lib.config_train_step(
            config, info, model_cfg, tx, schedule, rules=rules, interventions=clamps,
            steps_per_call=n,
        )
        for n in {1, steps_per_call}
    }  # fmt: skip
    eval_step, heldout = _heldout(config, info, model_cfg, rules, data)

    from repeat_scaling.data.batcher import Batcher

    batcher = Batcher(
        data.store.split("train"),
        data.plan,
        data.objective,
        int(tc.batch_size),
        int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=int(config.data.prefetch),
    )
    batch_sh = sharding.batch_sharding(mesh, rules)
    units = metrics.hardware_units(
        jax.devices()[0].platform, jax.device_count(), jax.process_count()
    )
    peak = float(tc.peak_tflops) or metrics.lookup_peak_tflops(jax.devices()[0].device_kind)
    return LoopSetup(
        state=state,
        start=start,
        ckpt=ckpt,
        step_fns=step_fns,
        steps_per_call=steps_per_call,
        eval_step=eval_step,
        heldout=heldout,
        batcher=batcher,
        batch_sh=batch_sh,
        stacked_sh=step_lib.stacked_sharding(batch_sh),
        tokens_per_step=int(derived["tokens_per_step"]),
        train_flops=float(derived["flops_per_token"]["train"]),
        peak_total=peak * units if peak else None,
        repeated_seen=int(batcher.repeated_examples(0, start).sum()),
        writer=metrics.MetricsWriter(
            workdir,
            total_steps=int(tc.steps),
            start_step=start,
            is_primary=jax.process_index() == 0,
            progress_bar=str(tc.progress_bar),
        ),
    )


def _init_source(
    config: Any, workdir: Any, model_cfg: Any, store: Any, committed: list[int]
) -> tuple[Any, dict[str, Any] | None]:
    """``(fine-tuning source or None, init_from record or None)``, checked before
    anything is written to the workdir (a resume checks the recorded ``init_from``)."""
    init_from, init_step = str(config.get("init_from", "")), int(config.get("init_step", -1))
    if committed:
        return None, init_from_lib.check_resume(workdir, init_from, init_step)
    if init_from:
        source = init_from_lib.resolve(init_from, init_step, model_cfg, store.vocab)
        return source, source.record()
    return None, None


def _derived(
    config: Any, model_cfg: Any, objective: Any, init_record: Any, clamps: Any
) -> dict[str, Any]:
    """The ``derived`` block of the record: :func:`derived_facts`, ``steps_per_call``,
    ``init_from`` and the attention clamps."""
    derived = derived_facts(config, model_cfg, objective)
    derived["steps_per_call"] = config_lib.steps_per_call(
        config, derived["tokens_per_step"] * derived["flops_per_token"]["train"]
    )
    derived["objective"] = run_data.objective_record(config.data, model_cfg.arch, objective)
    derived["init_from"] = init_record
    derived["interventions"] = [
        dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in clamps
    ]
    return derived


def _compare_record(
    config: Any, workdir: Any, resolved: dict[str, Any], committed: list[int], data: Any
) -> tuple[dict[str, Any] | None, list[Any]]:
    """``(recorded config or None, accepted changes)``: a resume's record compared with
    the resolved config before anything is overwritten or restored (ConfigError)."""
    recorded = run_files.read_json(workdir / run_files.CONFIG) if committed else None
    if committed and recorded is None:
        raise config_lib.ConfigError(
            f"{workdir} has checkpoints {committed} but no readable {run_files.CONFIG}; "
            "it cannot be resumed safely"
        )
    changes = record_lib.check_resume(workdir, recorded, resolved) if recorded else []
    if any(k == "train.steps" for k, _, _ in changes):
        _check_more_steps(config, recorded, committed[-1], *data)
    return recorded, changes


def _initial_state(
    config: Any, model_cfg: Any, ckpt: Any, info: Any, source: Any, tx, mesh, rules
) -> Any:
    """The newest committed checkpoint that verifies (falling back past corrupt ones);
    else, for a new fine-tuning run, the source parameters with a fresh optimizer state;
    else a new state."""
    state = ckpt.restore_latest_good(info.abstract, warn=lambda m: logging.warning("%s", m))
    if state is None and source is not None:
        params = source.load_params(model_cfg, info.abstract["params"], mesh, rules)
        state = state_lib.state_from_params(model_cfg, tx, info, params, int(config.seed), rules)
    elif state is None:
        state, _ = state_lib.create_train_state(model_cfg, tx, mesh, int(config.seed), rules)
    return state


def _write_record(
    workdir: Any,
    wrote: list[Any],
    resolved: dict[str, Any],
    source: Any,
    init_record: Any,
    data: run_data.RunData,
) -> None:
    """A new run's record: ``init_from.json`` when fine-tuning, ``config.json`` and
    ``data_plan.json`` (the plan's summary in store tokens, plus the objective's
    ``tokens_per_example`` in model tokens)."""
    if source is not None:
        run_files.write_json(workdir / run_files.INIT_FROM, init_record)
        wrote.append(workdir / run_files.INIT_FROM)
    run_files.write_json(workdir / run_files.CONFIG, resolved)
    wrote.append(workdir / run_files.CONFIG)
    plan = run_data.plan_record(data, resolved["derived"]["total_tokens"])
    run_files.write_json(workdir / run_files.DATA_PLAN, plan)
    wrote.append(workdir / run_files.DATA_PLAN)


def _heldout(
    config: Any, info: Any, model_cfg: Any, rules: Any, data: run_data.RunData
) -> tuple[Any, list[dict[str, np.ndarray]]]:
    """``(eval step, held-out batches)`` of the in-loop eval; ``(None, [])`` without
    ``train.eval_every``."""
    tc = config.train
    if not tc.eval_every:
        return None, []
    from repeat_scaling.data import pipeline
    from repeat_scaling.data.batcher import BatcherError

    eval_step = step_lib.make_eval_step(info, model_cfg, rules)
    try:
        heldout = pipeline.heldout_batches(
            data.store.split("validation"),
            data.objective,
            int(tc.batch_size),
            int(tc.eval_batches),
            int(config.seed),
        )
    except BatcherError as e:
        raise config_lib.ConfigError(f"train.eval_batches={tc.eval_batches}: {e}") from None
    return eval_step, heldout


# ----------------------------------------------------------------------------------
# The loop: step 8 of the module docstring
# ----------------------------------------------------------------------------------
class _MetricsLog:
    """Metrics of dispatched calls, fetched one call late (so the host does not wait for
    the device), checked for NaN/Inf and written at the logged steps."""

    def __init__(self, run: LoopSetup, log_every: int, total_steps: int):
        self.run, self.log_every, self.total_steps = run, log_every, total_steps
        # (first step, metrics on device (scalars, or [n] for n steps), time per step)
        self.pending: list[tuple[int, Any, float]] = []
        self.seen_at: dict[int, dict[str, int]] = {}  # step -> store tokens seen
        self.last: dict[str, Any] = {}

    def add(self, calls: list[tuple[int, Any]], step_time: float) -> None:
        self.pending.extend((first, m, step_time) for first, m in calls)

    def drain(self, force: bool = False) -> None:
        """Fetch metrics of finished calls; check finiteness; write logged steps."""
        run = self.run
        while self.pending and (force or len(self.pending) > 1):
            first, m, dt = self.pending.pop(0)
            fetched = {k: np.atleast_1d(v) for k, v in jax.device_get(m).items()}
            for i in range(len(fetched["loss"])):
                s = first + i
                host = {k: float(v[i]) for k, v in fetched.items()}
                if host["finite"] < 1.0:
                    raise NonFiniteLossError(
                        f"non-finite loss/gradient at step {s} (loss={host['loss']}, "
                        f"grad_norm={host['grad_norm']}); stopped without saving, "
                        f"last good checkpoint: {run.ckpt.latest_step()}"
                    )
                if s % self.log_every == 0 or s == self.total_steps:
                    record = {
                        "step": s,
                        "loss": host["loss"],
                        "accuracy": host["accuracy"],
                        "z_loss": host["z_loss"],
                        "aux_loss": host["aux_loss"],
                        "learning_rate": host["learning_rate"],
                        "grad_norm": host["grad_norm"],
                        "tokens_seen": s * run.tokens_per_step,
                        **self.seen_at[s],  # unique_tokens_seen, repeated_tokens_seen
                        "step_time_s": dt,
                        **metrics.throughput(
                            dt, run.tokens_per_step, run.train_flops, run.peak_total
                        ),
                    }
                    run.writer.write(record)
                    self.last = record
                self.seen_at.pop(s, None)


def _run_steps(run: LoopSetup, state: Any, rows: dict[str, np.ndarray], s: int, n: int):
    """Steps ``s+1 .. s+n`` on the stacked ``rows``: one call of ``steps_per_call`` steps,
    or one call per step (``steps_per_call=1``, or a span cut short). Returns the new
    state and ``[(first step, metrics on device)]`` of each call."""
    if n == run.steps_per_call > 1:
        state, m = run.step_fns[n](state, to_global(rows, run.stacked_sh))
        return state, [(s + 1, m)]
    calls = []
    for i in range(n):
        one = to_global({k: v[i] for k, v in rows.items()}, run.batch_sh)
        state, m = run.step_fns[1](state, one)
        calls.append((s + i + 1, m))
    return state, calls


def train_loop(config: Any, workdir: Any, lock: Any, run: LoopSetup) -> dict[str, Any]:
    """Train from ``run.start`` to ``train.steps``: batch -> step -> metrics, with the
    in-loop eval, the profile window, checkpoints and SIGTERM at call boundaries."""
    tc = config.train
    primary = jax.process_index() == 0
    total_steps, B = int(tc.steps), int(tc.batch_size)
    prof_start = int(tc.profile_start_step)
    prof_stop = prof_start + int(tc.profile_steps)
    state, run.state = run.state, None  # the loop owns the (donated) state
    batcher, ckpt, repeated_seen = run.batcher, run.ckpt, run.repeated_seen
    log = _MetricsLog(run, int(tc.log_every), total_steps)
    profiling = False

    def spans():
        """Steps of each compiled call: ``steps_per_call`` at a time, cut at checkpoints,
        evals, the profile window and the end (the same cuts whatever the start step)."""
        marks = (prof_start, prof_stop) if prof_start >= 0 else ()
        periods = (run.steps_per_call, ckpt.save_every, int(tc.eval_every))
        return call_spans(run.start, total_steps, periods, marks)

    t_prev = time.perf_counter()
    try:
        with _SigtermFlag() as sigterm:
            it = batcher.iter_spans(spans())
            for call, (s, n) in enumerate(spans(), run.start + 1):
                if s == prof_start and primary:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    profiling = True
                rows = next(it)
                reps = repeated_seen + np.cumsum(batcher.repeated_examples(s, s + n))
                for i, r in enumerate(reps.tolist(), s + 1):
                    log.seen_at[i] = batcher.plan.tokens_seen(i * B, r)
                repeated_seen = int(reps[-1])
                state, calls = _run_steps(run, state, rows, s, n)
                done = s + n
                # Step time = time between dispatches / steps; drain() waits for the
                # previous call's metrics, so in the steady state this is device time.
                now = time.perf_counter()
                log.add(calls, (now - t_prev) / n)
                t_prev = now
                log.drain()
                if profiling and done >= prof_stop:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                if run.eval_step is not None and done % int(tc.eval_every) == 0:
                    log.drain(force=True)
                    evaluated = _evaluate(run.eval_step, state, run.heldout, run.batch_sh)
                    run.writer.write_eval(done, evaluated)
                due = ckpt.save_every and done % ckpt.save_every == 0
                # multi-host: the sync-point counter must advance by one per call
                stop = sigterm.should_stop(call if run.steps_per_call > 1 else done)
                if due or stop or done == total_steps:
                    log.drain(force=True)  # never checkpoint a state produced by a NaN step
                    if lock is not None and lock.lost:  # taken over while this one hung
                        lock.check()
                    ckpt.save(state, force=True)
                    run.writer.flush()  # gs://: metrics up to every checkpoint survive a kill
                if stop:
                    ckpt.wait()
                    raise Preempted(done)
            log.drain(force=True)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        batcher.close()
        run.writer.close()
        ckpt.close()
    last = log.last
    if not last and primary:  # nothing left to train: report the last logged step
        last = _last_logged(workdir, run.start)
    return {"final_step": total_steps, "resumed_from": run.start, "last_metrics": last}


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
