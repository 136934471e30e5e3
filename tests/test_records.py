"""Run records that cannot lie: one trainer per workdir, resumes that must match the
record, verified checkpoints and stores, I/O errors that stop the trainer.

Every test starts from a copy of one tiny trained workdir (module fixture, 8 steps of
``configs/demo.py``'s decoder on the built-in corpus, checkpoints at 4 and 8) and checks
that nothing already committed (checkpoints, metrics, config.json, data_plan.json) was
lost.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from repeat_scaling import config_files, run_files, workdir_io
from repeat_scaling.train import checkpointing, loop, record
from repeat_scaling.train import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
demo = config_files.load_module(REPO / "configs" / "demo.py")
from test_train_loop import run_cli  # noqa: E402

STEPS = 8


def tiny_config(store_dir, **overrides):
    c = demo.get_config("dec")
    c.data.store = str(store_dir)
    c.data.source = ""
    c.data.length = 32
    c.train.batch_size = 8
    c.train.steps = STEPS
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.keep = 3
    c.train.progress_bar = "off"
    c.train.optimizer.decay_steps = 100  # the schedule does not depend on train.steps
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def trained(store_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("trained") / "run"
    loop.train(tiny_config(store_dir), wd)
    return wd


def snapshot(wd: pathlib.Path) -> dict:
    """What a workdir has committed: checkpoint steps and the record's bytes."""
    return {
        "steps": checkpointing.committed_steps(wd),
        "config": (wd / "config.json").read_bytes(),
        "plan": (wd / "data_plan.json").read_bytes(),
        "metrics": (wd / "train" / "metrics.jsonl").read_text().splitlines(),
    }


def assert_kept(wd: pathlib.Path, before: dict) -> None:
    """Nothing committed was lost: every checkpoint, the record, the logged lines."""
    after = snapshot(wd)
    assert set(before["steps"]) <= set(after["steps"]), (before["steps"], after["steps"])
    assert after["config"] == before["config"] and after["plan"] == before["plan"]
    assert after["metrics"][: len(before["metrics"])] == before["metrics"]


@pytest.fixture
def run_copy(trained, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    return wd, snapshot(wd)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------
# One trainer per workdir
# ----------------------------------------------------------------------------------
def _cli(workdir, store_dir, *args):
    """The trainer CLI on the tiny demo run (32-token rows, a checkpoint every 5 steps)."""
    return run_cli(
        workdir,
        store_dir,
        "--config.data.length=32",
        "--config.train.checkpoint_every=5",
        *args,
        wait=False,
    )


def test_second_trainer_exits_at_once_naming_the_holder(store_dir, tmp_path):
    wd = tmp_path / "w"
    first = _cli(wd, store_dir, "--config.train.steps=5000")
    try:
        metrics = wd / "train" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 6):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "first trainer logged no steps"
            time.sleep(0.5)
        config_before = (wd / "config.json").read_bytes()
        t0 = time.monotonic()
        second = _cli(wd, store_dir, "--config.train.optimizer.learning_rate=0.01")
        _, err = second.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        assert second.returncode == 1, err[-3000:]
        lines = [s for s in err.splitlines() if s.strip()]
        assert "Traceback" not in err and lines[-1].startswith("error: another trainer is")
        assert f"{socket.gethostname()}:{first.pid}" in lines[-1], lines[-1]
        assert first.poll() is None  # the holder trains on, undisturbed
        assert (wd / "config.json").read_bytes() == config_before
        print(f"second trainer refused in {elapsed:.1f} s")
    finally:
        first.terminate()  # SIGTERM: saves a checkpoint and exits 143
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    saved = checkpointing.committed_steps(wd)
    lrs = [json.loads(s)["learning_rate"] for s in (wd / "train" / "metrics.jsonl").open()]
    assert saved and len(lrs) >= saved[-1]
    # one schedule (warmup to 3e-3), never the second trainer's lr=0.01
    assert max(lrs) <= 3e-3 + 1e-9
    assert json.loads((wd / "config.json").read_text())["train"]["optimizer"][
        "learning_rate"
    ] == pytest.approx(3e-3)
    assert not (wd / run_files.TRAIN_LOCK).exists()  # released on exit


def test_stale_lock_is_taken_over_and_finished_run_reports_its_loss(store_dir, run_copy, caplog):
    wd, before = run_copy
    lock = wd / run_files.TRAIN_LOCK
    gone = f"{socket.gethostname()}:{dead_pid()}"
    lock.write_text(json.dumps({"owner": gone, "heartbeat": time.time(), "generation": 3}))
    summary = loop.train(tiny_config(store_dir), wd)
    assert any(f"took over the stale lock {lock} of {gone}" in r.message for r in caplog.records)
    assert not lock.exists()
    # rerunning the finished run: nothing trained, the last logged loss reported
    last = json.loads(before["metrics"][-1])
    assert summary["resumed_from"] == STEPS and summary["last_metrics"]["loss"] == last["loss"]
    assert_kept(wd, before)


def test_lock_heartbeat_staleness(tmp_path):
    path = tmp_path / "train.lock"
    for age, free in ((3600, True), (5, False)):
        path.write_text(json.dumps({"owner": "otherhost:1", "heartbeat": time.time() - age}))
        lock = workdir_io.workdir_lock(path, stale_s=60)
        if free:
            lock.acquire()
            assert "otherhost:1 (heartbeat 3600 s ago)" in lock.took_over
            rec = json.loads(path.read_text())
            assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
            assert isinstance(rec["heartbeat"], float)
            other = workdir_io.workdir_lock(path)
            other.owner = "otherhost:2"
            with pytest.raises(workdir_io.LockError, match=f"held by {lock.owner}"):
                other.acquire()
            lock.release()
            assert not path.exists()
        else:
            with pytest.raises(workdir_io.LockError, match="held by otherhost:1"):
                lock.acquire()
            assert path.exists()


def test_lock_of_an_earlier_run_of_a_requeued_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """SLURM requeues a job (same id, one more restart) after stopping all its tasks: the
    lock its first run left, fresh heartbeat and all, has no live holder."""
    path = tmp_path / "train.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = workdir_io.workdir_lock(path)
    first.acquire()  # kill -9 / node failure: never released
    first._stop.set()
    rec = json.loads(path.read_text())
    assert (rec["slurm_job"], rec["slurm_restart"]) == ("77", 0)
    again = workdir_io.workdir_lock(path)
    again.owner = "otherhost:9"
    with pytest.raises(workdir_io.LockError, match="held by"):
        again.acquire()  # the same run of the job: still its lock
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = workdir_io.workdir_lock(path)
    requeued.owner = "otherhost:9"
    requeued.acquire()
    assert "took over the stale lock" in requeued.took_over
    assert json.loads(path.read_text())["slurm_restart"] == 1
    requeued.release()


# ----------------------------------------------------------------------------------
# Resumes must match the record
# ----------------------------------------------------------------------------------
def test_a_key_the_record_predates_counts_as_its_default():
    """A record written before a config key existed (e.g. model.scan_unroll) resumes
    under its default; a non-default value is a difference."""
    from repeat_scaling.train import config as config_lib
    from repeat_scaling.train import record

    c = demo.get_config("dec")
    new = c.to_dict()
    new["model"] = config_lib.model_config(c).to_dict()
    old = json.loads(json.dumps(new))
    del old["model"]["scan_unroll"], old["train"]["steps_per_call"]
    assert record.differences(old, new) == []
    new["model"]["dropout_rate"] = 0.1
    new["model"]["scan_unroll"] = 2
    assert record.differences(old, new) == [
        ("model.dropout_rate", 0.0, 0.1),
        ("model.scan_unroll", 1, 2),
    ]
    assert record.is_resumable("model.scan_unroll")
    assert not record.is_resumable("model.dropout_rate")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (
            {"train.optimizer.learning_rate": 0.01},
            ["train.optimizer.learning_rate: 0.003 (recorded) vs 0.01 (now)"],
        ),
        (
            {"data.repeated_fraction": 0.5, "data.repeated_epochs": 4, "train.batch_size": 16},
            [
                "data.repeated_fraction: 0.0 (recorded) vs 0.5 (now)",
                "data.repeated_epochs: 1 (recorded) vs 4 (now)",
                "train.batch_size: 8 (recorded) vs 16 (now)",
            ],
        ),
        ({"model.d_model": 32}, ["model.d_model: 64 (recorded) vs 32 (now)"]),
    ],
)
def test_resume_with_another_config_is_refused(store_dir, run_copy, overrides, named):
    wd, before = run_copy
    with pytest.raises(config_lib.ConfigError) as e:
        loop.train(tiny_config(store_dir, **overrides), wd)
    msg = str(e.value)
    assert "\n" not in msg and "refusing to resume" in msg
    for n in named:
        assert n in msg, msg
    assert_kept(wd, before)
    assert not (wd / run_files.RESUME_LOG).exists()


def test_resumable_changes_are_logged_never_written_into_the_record(store_dir, run_copy):
    wd, before = run_copy
    # more steps: the plan orders its slots by their total count, so the past would change
    with pytest.raises(config_lib.ConfigError, match="train.steps: 8 .* changes the data"):
        loop.train(tiny_config(store_dir, **{"train.steps": STEPS + 2}), wd)
    c = tiny_config(store_dir, **{"train.keep": 5, "train.log_every": 2})
    c.eval.test_batches = 3
    summary = loop.train(c, wd)
    assert summary["resumed_from"] == STEPS
    assert_kept(wd, before)  # config.json and data_plan.json as the run that made them
    (entry,) = record.read_resume_log(wd)
    assert entry["step"] == STEPS
    assert entry["changes"] == {
        "eval.test_batches": [None, 3],
        "train.keep": [3, 5],
        "train.log_every": [1, 2],
    }
    recorded = json.loads(before["config"])
    effective = record.effective_config(recorded, record.read_resume_log(wd))
    assert effective["train"]["keep"] == 5 and recorded["train"]["keep"] == 3
    # the report applies and shows them
    from repeat_scaling.report import markdown
    from repeat_scaling.report import runs as runs_lib

    run = runs_lib.load_run(str(wd))
    assert run.resume_log == [entry] and run.config["train"]["keep"] == 5
    markdown.write_report([run], [], str(wd.parent / "report"))
    text = (wd.parent / "report" / "report.md").read_text()
    assert "Settings changed on resume" in text and "train.keep: 3 -> 5" in text


def test_more_steps_that_change_the_past_are_refused(store_dir, trained):
    recorded = json.loads((trained / "config.json").read_text())
    for overrides, why in (
        (
            {"train.optimizer.decay_steps": 0, "train.optimizer.warmup_steps": 0},
            "changes the learning rates of the 8 steps",
        ),
    ):
        old = tiny_config(store_dir, **overrides)
        new = tiny_config(store_dir, **{**overrides, "train.steps": 40})
        model_cfg = config_lib.validate(old)
        store, objective, plan = loop.open_data(new, model_cfg)
        rec = {**recorded, "train": {**recorded["train"], "steps": STEPS}}
        with pytest.raises(config_lib.ConfigError, match=f"train.steps: 8 .* {why}"):
            loop._check_more_steps(new, rec, STEPS, store, objective, plan)


def test_failed_start_leaves_no_record(store_dir, tmp_path):
    wd = tmp_path / "new"
    # fails after the data is built (held-out batches for the in-loop eval)
    c = tiny_config(store_dir, **{"train.eval_every": 2, "train.eval_batches": 10**6})
    with pytest.raises(config_lib.ConfigError, match="eval_batches=1000000: held-out split"):
        loop.train(c, wd)
    assert not (wd / "config.json").exists() and not (wd / "data_plan.json").exists()
    assert not (wd / run_files.TRAIN_LOCK).exists()


# ----------------------------------------------------------------------------------
# Verified checkpoints
# ----------------------------------------------------------------------------------
def _largest(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def corrupt(wd: pathlib.Path, how: str, step: int = STEPS) -> None:
    d = wd / "checkpoints" / str(step)
    if how == "flip":  # 64 bytes of the largest params data file
        f = _largest(d / "params" / "ocdbt.process_0" / "d")
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        f.write_bytes(bytes(data))
    elif how == "truncate":  # the largest train-state data file, cut in half
        f = _largest(d / "train" / "ocdbt.process_0" / "d")
        os.truncate(f, f.stat().st_size // 2)
    else:  # the train state's tree metadata
        (d / "train" / "_METADATA").unlink()


def _abstract(store_dir):
    from repeat_scaling import sharding
    from repeat_scaling.train import optimizers
    from repeat_scaling.train import state as state_lib

    c = tiny_config(store_dir)
    model_cfg = config_lib.validate(c)
    tx, _ = optimizers.make_optimizer(c.train.optimizer, STEPS)
    mesh = sharding.make_mesh({"data": -1})
    return state_lib.abstract_state(model_cfg, tx, mesh, sharding.DEFAULT_RULES).abstract


@pytest.mark.parametrize("how", ["truncate", "metadata"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good(store_dir, run_copy, how):
    wd, before = run_copy
    corrupt(wd, how)
    warnings = []
    ckpt = checkpointing.Checkpointer(wd, save_every=4)
    state = ckpt.restore_latest_good(_abstract(store_dir), warn=warnings.append)
    ckpt.close()
    assert int(state["step"]) == 4
    (w,) = warnings
    assert "checkpoint step 8 is corrupt or unreadable" in w and "resuming from step 4" in w
    assert checkpointing.committed_steps(wd) == [4]
    (kept,) = (wd / checkpointing.CORRUPT_DIR).iterdir()  # moved aside, not deleted
    assert kept.name.startswith("8-")
    assert_kept(wd, {**before, "steps": [4]})


def test_flipped_params_bytes_resume_from_the_good_checkpoint_and_the_evaluator_retries(
    store_dir, trained, run_copy, caplog
):
    from repeat_scaling.eval import evaluator, results
    from repeat_scaling.eval.settings import EvalSettings

    wd, before = run_copy
    corrupt(wd, "flip")
    # the evaluator: an error for step 8, never a null metric counted as done
    small = EvalSettings(batch_size=8, test_batches=1, memorisation_examples=8,
                                 copy_examples=8, random_repeat_examples=8, icl_examples=8,
                                 probe_sequences=8, frequency_tokens=200_000)  # fmt: skip
    ev = evaluator.Evaluator(wd, small, evaluator.eval_mesh(1), warn=lambda m: None)
    with pytest.raises(
        evaluator.EvalError,
        match="step 8: checkpoint .* (does not match the checksums|restored non-finite)",
    ):
        ev.run_all()
    ev.writer.close()
    assert [r["step"] for r in results.read_results(results.results_path(wd))] == [4]
    errors = (wd / run_files.EVAL_ERRORS).read_text().splitlines()
    assert [json.loads(e)["step"] for e in errors] == [8]
    # the trainer: falls back to step 4 and retrains 5..8 exactly
    summary = loop.train(tiny_config(store_dir), wd)
    assert summary["resumed_from"] == 4
    assert any("checkpoint step 8 is corrupt" in r.message for r in caplog.records)

    def losses(lines):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]

    after = snapshot(wd)
    assert losses(after["metrics"]) == losses(before["metrics"])  # bit for bit
    assert after["steps"] == before["steps"] and after["config"] == before["config"]
    # the evaluator's next pass retries step 8 (now a good checkpoint)
    ev = evaluator.Evaluator(wd, small, evaluator.eval_mesh(1), warn=lambda m: None)
    assert [r["step"] for r in ev.run_all()] == [8]
    ev.writer.close()


# ----------------------------------------------------------------------------------
# Verified stores
# ----------------------------------------------------------------------------------
def test_corrupt_store_is_refused_and_prepare_rebuilds_it(
    store_dir, run_copy, tmp_path, monkeypatch
):
    from repeat_scaling.data.store import StoreError, TokenStore, verified_cache_path
    from repeat_scaling.eval import evaluator
    from repeat_scaling.prepare import prepare_store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wd, before = run_copy
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    TokenStore(store).verify()  # hashed once, then cached by size and mtime
    cached = json.loads(pathlib.Path(verified_cache_path()).read_text())
    assert len(cached) == 2 and all(v[0] > 0 for v in cached.values())
    shard = next((store / "train").glob("tokens-*.bin"))
    data = bytearray(shard.read_bytes())
    data[1000:1064] = bytes(64)  # 64 zero bytes: still valid token ids
    shard.write_bytes(bytes(data))
    # the trainer refuses it before writing anything
    with pytest.raises(StoreError, match=f"token shard {shard} does not match its sha256"):
        loop.train(tiny_config(store), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # the evaluator too
    cfg = json.loads((wd / "config.json").read_text())
    cfg["data"]["store"] = str(store)
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match="does not match its sha256 .* prepare --overwrite"):
        evaluator.Run.load(wd)
    # prepare says so, and rebuilds it with --overwrite
    quiet = {"progress": False, "log": lambda *_: None}
    with pytest.raises(StoreError, match=f"{store} is corrupt .* pass --overwrite"):
        prepare_store("builtin", "byte", str(store), **quiet)
    prepare_store("builtin", "byte", str(store), overwrite=True, **quiet)
    TokenStore(store).verify(cached=False)
    assert_kept(wd, {**before, "config": (wd / "config.json").read_bytes()})


# ----------------------------------------------------------------------------------
# Bad input: one line, nothing written
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("train.optimizer.learning_rate", float("inf")),
        ("train.z_loss", float("nan")),
        ("data.mean_noise_span_length", float("-inf")),
    ],
)
def test_non_finite_floats_are_one_line_errors(store_dir, tmp_path, key, value):
    with pytest.raises(config_lib.ConfigError) as e:
        loop.train(tiny_config(store_dir, **{key: value}), tmp_path / "w")
    assert str(e.value) == f"{key}={value!r}; expected a finite number"
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------
# I/O errors stop the trainer
# ----------------------------------------------------------------------------------
def test_disk_full_in_the_event_writer_stops_the_trainer(store_dir, tmp_path, monkeypatch):
    import errno

    from tensorboardX import record_writer

    from repeat_scaling.train import metrics

    real, calls = record_writer.RecordWriter.write, []

    def write(self, data):  # ENOSPC once step 6's scalars are written
        calls.append(1)
        if len(calls) > 5 * len(metrics.FIELDS):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    wd = tmp_path / "w"
    t0 = time.monotonic()
    with pytest.raises(metrics.MetricsIOError) as e:
        loop.train(tiny_config(store_dir), wd)
    assert "\n" not in str(e.value) and "No space left on device" in str(e.value)
    assert time.monotonic() - t0 < 120  # stopped, never hung
    assert checkpointing.committed_steps(wd) == [4]  # the committed checkpoint is kept
    assert (wd / "config.json").is_file() and not (wd / run_files.TRAIN_LOCK).exists()
