"""gs:// workdirs for real, against a local GCS emulator (``gcp-storage-emulator``).

gcsfs (workdir files: config.json, metrics.jsonl, results.jsonl, the lock) reaches the
emulator through ``STORAGE_EMULATOR_HOST``; tensorstore (orbax's checkpoint arrays)
through ``TENSORSTORE_GCS_HTTP_URL`` with ``GOOGLE_AUTH_TOKEN_FOR_TESTING``; tensorboardX
through google-cloud-storage (also ``STORAGE_EMULATOR_HOST``). Nothing is mocked: the
same code paths as on a real bucket. The emulator is made a little more faithful: its
downloads carry the ``x-goog-generation`` header that real GCS sends (tensorstore's
OCDBT manifest updates need it; see ``EMULATOR``). It ignores the ``ifGenerationMatch=0``
preconditions (``ifGenerationMatch``), so the lock's protection against two racing
writers is not exercised; the owner re-reads that back it up (a taken-over holder stops
heart-beating, never deletes the new owner's lock, and its results writer refuses to
write) are.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from repeat_scaling import config_files

if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gs:// workdirs need gcsfs", allow_module_level=True)
if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("pip install gcp-storage-emulator", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bkt"


# The emulator's CLI, with downloads answering the x-goog-generation/metageneration
# headers of real GCS (without them tensorstore fails OCDBT manifest rewrites with
# "Malformed StorageGeneration").
EMULATOR = """
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:
        pass
    return _download(request, response, storage, *args, **kwargs)


objects.download = download
from gcp_storage_emulator.__main__ import main

main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running emulator with bucket ``bkt``; yields the env for child processes."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            EMULATOR,
            "start",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
            "-q",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.2)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials against the emulator
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "1",  # the emulator is racy under load
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import gcsfs.core

    # The core class: gcsfs's default (extended) one probes each bucket's type over gRPC,
    # which the emulator does not serve.
    fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    yield env
    fsspec.config.conf["gs"].pop("token", None)
    fsspec.register_implementation("gs", gcsfs.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _fs():
    import fsspec

    return fsspec.filesystem("gs")


# ----------------------------------------------------------------------------------
# The path layer
# ----------------------------------------------------------------------------------
def test_workdir_io_round_trip(gcs):
    from repeat_scaling import workdir_io

    wd = workdir_io.check_workdir("gs://bkt/io/")
    assert str(wd) == "gs://bkt/io" and not isinstance(wd, pathlib.Path)
    workdir_io.mkdirs(wd)  # nothing to do on GCS
    workdir_io.write_json_atomic(wd / "config.json", {"b": 1, "a": [1, 2]})
    assert json.loads((wd / "config.json").read_text()) == {"a": [1, 2], "b": 1}
    assert workdir_io.read_text(wd / "missing.json") is None

    # JSONL: buffered until flush (object stores cannot append), then one object.
    path = wd / "train" / "metrics.jsonl"
    app = workdir_io.JsonlAppender(path, flush_seconds=3600)
    app.write_line('{"step": 1}')
    app.write_line('{"step": 2}\n')
    assert not path.exists()
    app.flush()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    app.close()
    workdir_io.append_line(path, '{"step": 3}')  # reopen: keeps what is there
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]

    with pytest.raises(workdir_io.WorkdirError, match="bucket gs://nobucket does not exist"):
        workdir_io.check_workdir("gs://nobucket/run")
    with pytest.raises(workdir_io.WorkdirError, match="expected gs://BUCKET/PATH"):
        workdir_io.workdir_path("gs://")
    with pytest.raises(workdir_io.WorkdirError, match="data.store='gs://bkt/store' is a URL"):
        workdir_io.require_local("gs://bkt/store", "data.store")


def test_results_writer_and_lock_on_gcs(gcs):
    from repeat_scaling import workdir_io
    from repeat_scaling.eval import results

    wd = "gs://bkt/res"
    w = results.ResultsWriter(wd)
    assert w.append({"step": 2, "test_loss": 3.5}) and not w.append({"step": 2})
    assert w.append({"step": 4, "test_loss": float("nan")})
    with pytest.raises(results.ResultsLockedError, match="held by"):
        results.ResultsWriter(wd)  # a live writer (this process) holds the lock
    w.close()
    assert not _fs().exists("bkt/res/eval/results.lock")
    recs = results.read_results(results.results_path(wd))
    assert [(r["step"], r["test_loss"]) for r in recs] == [(2, 3.5), (4, None)]

    # A lock left by a killed evaluator (dead pid on this host) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{socket.gethostname()}:{dead.pid}"
    _fs().pipe_file(
        "bkt/res/eval/results.lock", json.dumps({"owner": owner, "heartbeat": time.time()}).encode()
    )
    w2 = results.ResultsWriter(wd)
    assert w2.done_steps == {2, 4}
    w2.close()
    # A stale heartbeat from another host is taken over too; a fresh one is not.
    lock = workdir_io.GcsLock(workdir_io.workdir_path(wd) / "eval" / "results.lock", stale_s=60)
    for age, ok in ((3600, True), (5, False)):
        record = {"owner": "otherhost:1", "heartbeat": time.time() - age}
        _fs().pipe_file("bkt/res/eval/results.lock", json.dumps(record).encode())
        if ok:
            lock.acquire()
            lock.release()
        else:
            with pytest.raises(workdir_io.GcsLockError, match="otherhost:1"):
                lock.acquire()


def test_taken_over_lock_is_never_overwritten_or_deleted(gcs):
    from repeat_scaling import workdir_io
    from repeat_scaling.eval import results

    wd = "gs://bkt/takeover"
    key = "bkt/takeover/eval/results.lock"
    path = workdir_io.workdir_path(wd) / "eval" / "results.lock"

    def token():
        return json.loads(_fs().cat_file(key))["token"]

    # A holder on another host that stops heart-beating (paused) ...
    paused = workdir_io.GcsLock(path, heartbeat_s=3600)
    paused.owner = "otherhost:7"
    paused.acquire()
    assert token() == paused.token
    paused.check()  # still ours
    # ... is taken over once its heartbeat is stale (stale_s=0: at once).
    new = workdir_io.GcsLock(path, heartbeat_s=0.2, stale_s=0)
    new.acquire()
    assert token() == new.token != paused.token
    with pytest.raises(workdir_io.GcsLockError, match="no longer held by otherhost:7"):
        paused.check()
    assert paused.lost
    paused.release()  # must not delete the new owner's lock
    assert token() == new.token
    time.sleep(0.6)  # the new owner's heartbeats rewrite its own lock only
    assert token() == new.token and not new.lost
    new.release()
    assert not _fs().exists(key)

    # A paused holder's heartbeat thread that wakes after the takeover stops, unwritten.
    slow = workdir_io.GcsLock(path, heartbeat_s=0.3)
    slow.owner = "otherhost:8"
    slow.acquire()
    thief = workdir_io.GcsLock(path, heartbeat_s=3600, stale_s=0)
    thief.acquire()
    time.sleep(0.9)
    assert slow.lost and token() == thief.token
    slow.release()
    thief.release()
    assert not _fs().exists(key)

    # A results writer whose lock was taken over refuses to upload.
    w = results.ResultsWriter(wd)
    assert w.append({"step": 1, "test_loss": 2.0})
    other = workdir_io.GcsLock(path, heartbeat_s=3600, stale_s=0)
    _fs().pipe_file(key, json.dumps({"owner": "otherhost:9", "token": w._lock.token,
                                     "heartbeat": 0}).encode())  # fmt: skip
    other.acquire()
    with pytest.raises(results.ResultsLockedError, match="cannot write .*no longer held"):
        w.append({"step": 2, "test_loss": 1.0})
    w.close()
    assert token() == other.token  # the writer's close left the new owner's lock alone
    other.release()
    assert [r["step"] for r in results.read_results(results.results_path(wd))] == [1]


def test_gcs_workdir_with_relative_store_is_a_one_line_error(gcs, tmp_path, monkeypatch):
    demo = config_files.load_module(REPO / "configs" / "demo.py")

    from repeat_scaling import workdir_io
    from repeat_scaling.eval import evaluator
    from repeat_scaling.train import config as config_lib
    from repeat_scaling.train import loop

    c = demo.get_config("dec")
    model_cfg = config_lib.model_config(c)
    record = loop.resolved_config(c, model_cfg, {})
    # a record with a relative store (written before the trainer recorded absolute paths)
    record["data"]["store"] = "stores/byte"
    wd = workdir_io.workdir_path("gs://bkt/relstore")
    workdir_io.write_json_atomic(wd / "config.json", record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(evaluator.EvalError) as err:
        evaluator.Run.load("gs://bkt/relstore")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.store='stores/byte' in gs://bkt/relstore/")
    assert "is relative and not found from the current directory" in msg
    record["data"]["store"] = "gs://bkt/store"
    workdir_io.write_json_atomic(wd / "config.json", record)
    with pytest.raises(evaluator.EvalError, match="data.store='gs://bkt/store' is a URL"):
        evaluator.Run.load("gs://bkt/relstore")


def test_metrics_writer_on_gcs_truncates_on_resume(gcs):
    from repeat_scaling.train import metrics

    def rec(step):
        return {"step": step, "loss": 1.0 / step, "learning_rate": 0.1}

    w = metrics.MetricsWriter("gs://bkt/m", total_steps=4, start_step=0, progress_bar="off")
    for s in (1, 2, 3, 4):
        w.write(rec(s))
    w.write_eval(4, {"loss": 0.5})
    w.close()
    text = _fs().cat("bkt/m/train/metrics.jsonl").decode()
    assert [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3, 4]
    assert _fs().glob("bkt/m/tensorboard/events.out.tfevents.*")
    # Resume from step 2: lines of the lost steps 3-4 (and eval at 4) are dropped.
    w = metrics.MetricsWriter("gs://bkt/m", total_steps=4, start_step=2, progress_bar="off")
    w.write(rec(3))
    w.close()
    text = _fs().cat("bkt/m/train/metrics.jsonl").decode()
    assert [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3]
    assert _fs().cat("bkt/m/train/eval.jsonl").decode() == ""


# ----------------------------------------------------------------------------------
# Train (checkpoint), lose the last checkpoint, resume, evaluate, status: all on gs://
# ----------------------------------------------------------------------------------
def _cli(args, env, timeout=300):
    full = {**os.environ, **env, "JAX_PLATFORMS": "cpu"}
    full.pop("XLA_FLAGS", None)  # one CPU device
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout
    )


def _losses(text):
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in text.splitlines()}


@pytest.mark.slow
def test_train_resume_evaluate_status_on_gcs(gcs, store_dir, tmp_path):
    env = {
        **gcs,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    train = [
        "-m",
        "repeat_scaling.train",
        f"--config={REPO / 'configs' / 'demo.py'}:dec",
        "--workdir=gs://bkt/sweep/run",
        f"--config.data.store={store_dir}",
        "--config.data.source=",
        "--config.data.length=32",
        "--config.train.batch_size=8",
        "--config.train.steps=4",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=2",
        "--config.train.progress_bar=off",
    ]
    first = _cli(train, env)
    assert first.returncode == 0, first.stderr[-3000:]
    fs = _fs()
    assert fs.exists("bkt/sweep/run/config.json") and fs.exists("bkt/sweep/run/data_plan.json")
    assert fs.exists("bkt/sweep/run/checkpoints/4/commit_success.txt")
    want = _losses(fs.cat("bkt/sweep/run/train/metrics.jsonl").decode())
    assert sorted(want) == [1, 2, 3, 4]

    # As if killed after the step-2 checkpoint: the step-4 checkpoint never committed.
    fs.rm("bkt/sweep/run/checkpoints/4", recursive=True)
    again = _cli(train, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from 2" in again.stderr
    got = _losses(fs.cat("bkt/sweep/run/train/metrics.jsonl").decode())
    assert sorted(got) == [1, 2, 3, 4]  # lines 3-4 of the lost part rewritten once
    assert got[4] == pytest.approx(want[4], rel=1e-6)  # exact resume from GCS

    ev = _cli(
        [
            "-m",
            "repeat_scaling.evaluate",
            "--workdir=gs://bkt/sweep/run",
            "--eval_config=test_batches=1,memorisation_examples=8,copy_examples=2,"
            "random_repeat_examples=2,icl_examples=2,probe_sequences=2,frequency_tokens=10000",
        ],
        env,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in fs.cat("bkt/sweep/run/eval/results.jsonl").split()]
    assert steps == [2, 4] and not fs.exists("bkt/sweep/run/eval/results.lock")

    st = _cli(["launch/status.py", "--root=gs://bkt/sweep"], env, timeout=120)
    assert st.returncode == 0, st.stderr
    line = st.stdout.splitlines()[0]
    assert line.startswith("run ") and " done " in line and "4/4" in line, st.stdout

    from repeat_scaling.report import runs as report_runs

    loaded, problems = report_runs.load_runs(["gs://bkt/sweep/*"])
    assert not problems and [r.path for r in loaded] == ["gs://bkt/sweep/run"]
    assert [r["step"] for r in loaded[0].results] == [2, 4] and loaded[0].finished

    bad = _cli(train[:3] + ["--workdir=gs://nobucket/run"], env)
    assert bad.returncode == 1
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1, bad.stderr
    assert err[0] == "error: --workdir='gs://nobucket/run': bucket gs://nobucket does not exist"
    assert "Traceback" not in bad.stderr

    # Fine-tune from the gs:// run's step-2 checkpoint (init_from="{root}/<run>" on a gs://
    # root): the first update is 0 under the demo's warmup, so step 1 == the source's step 2.
    ft = _cli(
        train[:3]
        + train[4:8]  # the same store, length and batch
        + [
            "--config.train.progress_bar=off",
            "--workdir=gs://bkt/ft/run",
            "--config.init_from=gs://bkt/sweep/run/checkpoints/2",
            "--config.train.steps=1",
            "--config.train.checkpoint_every=1",
        ],
        env,
    )
    assert ft.returncode == 0, ft.stderr[-3000:]
    rec = json.loads(fs.cat("bkt/ft/run/init_from.json"))
    assert (rec["path"], rec["kind"], rec["step"]) == ("gs://bkt/sweep/run", "run", 2)
    assert rec["vocab_check"] == f"same vocabulary as {store_dir}"
    from repeat_scaling.train import checkpointing

    _, src, _ = checkpointing.restore_params("gs://bkt/sweep/run", 2)
    _, got, _ = checkpointing.restore_params("gs://bkt/ft/run", 1)
    import jax
    import numpy as np

    for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
