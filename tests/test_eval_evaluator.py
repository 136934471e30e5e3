"""The evaluator on real runs: a tiny decoder trained on 8 devices, evaluated on 1 or 8.

One run is trained in-process (module fixture, 4 steps, checkpoints at 2 and 4) on the
tinyshakespeare text with the byte vocabulary; each test works on its own copy of it.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from repeat_scaling import config_files
from repeat_scaling.eval import evaluator, results
from repeat_scaling.eval.settings import EvalSettings

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(
    batch_size=8,
    test_batches=1,
    memorisation_examples=8,
    copy_examples=8,
    random_repeat_examples=8,
    icl_examples=8,
    probe_sequences=8,
    frequency_tokens=200_000,
)
SMALL_FLAG = ",".join(f"{k}={v}" for k, v in SMALL.items())
TRAIN_OVERRIDES = {
    "data.length": 64,
    "data.repeated_fraction": 0.5,
    "data.repeated_epochs": 2,
    "train.steps": 4,
    "train.checkpoint_every": 2,
    "train.keep": 3,
    "train.batch_size": 8,
    "train.log_every": 2,
    "train.progress_bar": "off",
}


def _env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture(scope="module")
def store(shared_data, tmp_path_factory):
    from repeat_scaling.prepare import prepare_store

    out = tmp_path_factory.mktemp("store") / "shakespeare-byte"
    src = f"text:{shared_data / 'tinyshakespeare' / 'input.txt'}"
    prepare_store(src, "byte", out, progress=False, log=lambda m: None)
    return out


def _demo_config(store_dir):
    c = config_files.load(f"{REPO}/configs/demo.py:dec")
    c.data.store = str(store_dir)
    for key, value in TRAIN_OVERRIDES.items():
        group, name = key.split(".")
        c[group][name] = value
    return c


@pytest.fixture(scope="module")
def live(store, tmp_path_factory):
    """A run trained on 8 devices by a trainer subprocess while a 1-device evaluator
    ``--watch``es it (in this process): ``(workdir, records)``."""
    work = tmp_path_factory.mktemp("runs") / "live"
    trainer = subprocess.Popen(
        _train_cmd(work, store),
        env=_env(8),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "data_plan.json").exists():
            assert trainer.poll() is None, trainer.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "trainer wrote no data_plan.json"
            time.sleep(0.2)
        assert evaluator.committed_steps(work) == []  # the evaluator starts before any save
        ev = evaluator.Evaluator(work, EvalSettings(**SMALL), evaluator.eval_mesh(1))
        recs = ev.run_all(watch=True, poll_seconds=0.5, timeout_seconds=180)
    finally:
        trainer.wait(timeout=180)
    stderr = trainer.stderr.read()
    assert trainer.returncode == 0, stderr[-2000:]
    # Quiet by default: the libraries' INFO lines (orbax: ~60 per checkpoint) are dropped.
    assert not LIBRARY_INFO.findall(stderr), stderr[-2000:]
    assert "done: step 4" in stderr
    return work, recs


#: An absl INFO line from orbax (e.g. ``I1203 10:43:27.49 1398 checkpoint_manager.py:701]``).
LIBRARY_INFO = re.compile(r"^I\d{4} .* checkpoint_manager\.py:\d+\]", re.M)


def _train_cmd(work, store, *extra):
    return [
        sys.executable,
        "-m",
        "repeat_scaling.train",
        f"--config={REPO / 'configs' / 'demo.py'}",
        f"--workdir={work}",
        f"--config.data.store={store}",
        *[f"--config.{k}={v}" for k, v in TRAIN_OVERRIDES.items()],
        *extra,
    ]


def test_library_logs_flag_shows_the_libraries_info_lines(live, store, tmp_path):
    work = _copy(live[0], tmp_path / "run")
    cmd = _train_cmd(work, store, "--library_logs")
    r = subprocess.run(cmd, env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert LIBRARY_INFO.findall(r.stderr) and "already trained, nothing to do" in r.stderr


def test_watch_live_two_checkpoint_run(live):
    work, recs = live
    assert [r["step"] for r in recs] == [2, 4]
    assert [r["step"] for r in results.read_results(results.results_path(work))] == [2, 4]
    assert all(r["num_devices"] == 1 for r in recs)
    assert json.loads((work / "config.json").read_text())["derived"]["num_devices"] == 8


def _copy(workdir, dest):
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("eval"))
    return dest


def test_restore_8_devices_onto_1_identical_test_loss(live, tmp_path):
    trained, live_records = live
    settings = EvalSettings(**SMALL)
    ev8 = evaluator.Evaluator(_copy(trained, tmp_path / "a"), settings, evaluator.eval_mesh(0))
    ev1 = evaluator.Evaluator(_copy(trained, tmp_path / "b"), settings, evaluator.eval_mesh(1))
    assert ev8.mesh.devices.size == 8 and ev1.mesh.devices.size == 1
    m8, _ = ev8.restore(4)
    m1, _ = ev1.restore(4)
    from flax import nnx

    p8 = jax.tree.leaves(nnx.to_pure_dict(nnx.state(m8, nnx.Param)))
    p1 = jax.tree.leaves(nnx.to_pure_dict(nnx.state(m1, nnx.Param)))
    assert len(p1[0].sharding.device_set) == 1
    for a, b in zip(p8, p1):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r8 = {r["step"]: r for r in ev8.run_all()}
    r1 = {r["step"]: r for r in live_records}  # the 1-device watcher's records
    for step in (2, 4):
        np.testing.assert_allclose(r1[step]["test_loss"], r8[step]["test_loss"], rtol=1e-6)
        assert r1[step]["test_accuracy"] == r8[step]["test_accuracy"]
    rec = r1[4]
    # The results schema the report relies on.
    for key in (
        "step tokens_seen unique_tokens_seen repeated_tokens_seen test_loss test_accuracy "
        "repeated_loss unique_seen_loss copy_loss random_repeat_loss prefix_matching "
        "previous_token copying_score icl_score prefix_matching_heads previous_token_heads "
        "copying_score_heads loss_by_position icl_positions eval_time_s"
    ).split():
        assert key in rec, key
    assert np.asarray(rec["prefix_matching_heads"]).shape == (2, 4)  # dec_tiny: 2 layers x 4
    assert len(rec["loss_by_position"]) == 64 and rec["icl_positions"] == [31, 63]
    assert rec["tokens_seen"] == 4 * 8 * 64
    assert rec["repeated_tokens_seen"] + rec["unique_tokens_seen"] == 4 * 8 * 64
    assert 0 < rec["test_loss"] < 10 and rec["repeated_loss"] is not None
    # The trainer's own accounting agrees with the evaluator's.
    train_log = [
        json.loads(x) for x in (trained / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    last = [r for r in train_log if r["step"] == 4][-1]
    for key in ("tokens_seen", "unique_tokens_seen", "repeated_tokens_seen"):
        assert rec[key] == last[key], key


def test_all_data_seen_once_is_unique_data(live, tmp_path):
    """f = 1, E = 1 trains on the same chunks as f = 0: no repeated-subset loss is
    recorded, and the unique-data loss is measured on chunks seen so far."""
    trained, _ = live
    work = _copy(trained, tmp_path / "once")
    config = json.loads((work / "config.json").read_text())
    config["data"]["repeated_fraction"], config["data"]["repeated_epochs"] = 1.0, 1
    (work / "config.json").write_text(json.dumps(config))
    (work / "data_plan.json").unlink()  # the trainer's record of the f = 0.5 plan
    ev = evaluator.Evaluator(work, EvalSettings(**SMALL), evaluator.eval_mesh(1))
    assert ev.run.plan.num_repeated > 0 and ev.run.plan.epochs == 1
    rec = ev.evaluate_step(4)
    assert rec["repeated_loss"] is None and 0 < rec["unique_seen_loss"] < 10
    seen = set(ev.run.plan.chunks(np.arange(4 * 8))[0].tolist())
    assert set(ev._seen_once(4 * 8).tolist()) <= seen


def test_recorded_objective_is_used_and_the_plan_record_checked(live, tmp_path):
    """The evaluator builds the objective the trainer recorded (``derived.objective``), not
    one re-derived from ``data.*``, and refuses a ``data_plan.json`` its plan does not
    reproduce."""
    trained, _ = live
    work = _copy(trained, tmp_path / "run")
    config = json.loads((work / "config.json").read_text())
    recorded = config["derived"]["objective"]
    assert recorded["name"] == config["data"]["objective"]
    assert recorded["options"]["length"] == config["data"]["length"]
    assert recorded["tokens_per_example"] == config["derived"]["tokens_per_step"] // 8
    config["data"]["length"] = 2 * config["data"]["length"]  # not what was trained
    (work / "config.json").write_text(json.dumps(config))
    ev = evaluator.Evaluator(work, EvalSettings(**SMALL), evaluator.eval_mesh(1))
    assert (
        ev.run.objective.feature_lengths["decoder_target_tokens"] == recorded["options"]["length"]
    )
    plan = json.loads((work / "data_plan.json").read_text())
    plan["num_slots"] += 8
    (work / "data_plan.json").write_text(json.dumps(plan))
    with pytest.raises(
        evaluator.EvalError,
        match=r"data_plan.json does not match .*num_slots: \d+ \(recorded\) vs \d+ \(rebuilt\)",
    ):
        evaluator.Evaluator(work, EvalSettings(**SMALL), evaluator.eval_mesh(1))


def test_deleted_checkpoint_is_skipped_and_errors_are_clear(live, tmp_path):
    trained, _ = live
    settings = EvalSettings(**SMALL)
    work = _copy(trained, tmp_path / "run")
    warnings = []
    ev = evaluator.Evaluator(work, settings, evaluator.eval_mesh(1), warn=warnings.append)
    assert ev.pending() == [2, 4]
    shutil.rmtree(work / "checkpoints" / "2")  # what keep-N retention does
    assert ev.evaluate_step(2) is None
    assert "step 2 was deleted" in warnings[0]
    # A workdir whose config names another model than the checkpoints hold.
    other = _copy(trained, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["d_model"] = 32
    (other / "config.json").write_text(json.dumps(cfg))
    ev_other = evaluator.Evaluator(other, settings, evaluator.eval_mesh(1))
    with pytest.raises(evaluator.EvalError, match="does not match model 'dec_tiny'"):
        ev_other.run_all()
    # No checkpoints at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained / "config.json", empty / "config.json")
    with pytest.raises(evaluator.EvalError, match="no committed checkpoint"):
        evaluator.Evaluator(empty, settings, evaluator.eval_mesh(1)).run_all()
    with pytest.raises(evaluator.EvalError, match="not a training workdir"):
        evaluator.Evaluator(tmp_path / "nothing", settings)
    with pytest.raises(ValueError, match="unknown eval_config key 'batch'"):
        EvalSettings.from_overrides({"batch": 3})


def _cli(workdir, *flags):
    return [
        sys.executable,
        "-m",
        "repeat_scaling.evaluate",
        f"--workdir={workdir}",
        f"--eval_config={SMALL_FLAG}",
        *flags,
    ]


def test_cli_kill_and_restart_never_duplicates(live, tmp_path):
    trained, _ = live
    work = _copy(trained, tmp_path / "run")
    path = results.results_path(work)
    proc = subprocess.Popen(
        _cli(work, "--num_devices=1"),
        env=_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = path.read_text().splitlines()
    assert len(first) >= 1
    done = subprocess.run(
        _cli(work, "--num_devices=1"), env=_env(1), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = path.read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == [2, 4], steps  # each step exactly once, in order
    assert lines[: len(first)] == first
    # TensorBoard (its own reader): every metric once per step after the two passes.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tensorboard" / "eval"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("eval/test_loss")]
    want = [(r["step"], r["test_loss"]) for r in map(json.loads, lines)]
    assert [s for s, _ in got] == [2, 4] and np.allclose(got, want)
    assert "eval/prefix_matching" in acc.Tags()["scalars"]
    # A corrupt line (e.g. edited by hand) is reported, not fatal.
    with open(path, "a") as f:
        f.write("{oops\n")
    warnings = []
    ev = evaluator.Evaluator(work, EvalSettings(**SMALL), warn=warnings.append)
    assert ev.run_all() == [] and ev.writer.done_steps == {2, 4}
    assert "results.jsonl:3: corrupt results line skipped" in warnings[0]
    # Clear one-line CLI errors.
    bad = subprocess.run(_cli(tmp_path / "missing"), env=_env(1), capture_output=True, text=True)
    assert bad.returncode == 1
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in bad.stderr
    )


def test_clamped_run_on_a_pairs_store_is_flagged_unclamped(tmp_path):
    """Decoding ignores attention clamps: the evaluator says so (log + record field)."""
    from repeat_scaling.eval import downstream
    from repeat_scaling.prepare_tasks import prepare_task_store
    from repeat_scaling.train import checkpointing, loop
    from repeat_scaling.train import config as config_lib

    store = tmp_path / "copy_word"
    prepare_task_store(
        "builtin_task:copy_word:max_words=64",
        "byte",
        store,
        inputs_length=16,
        targets_length=12,
        log=lambda m: None,
    )
    c = _demo_config(store)
    c.data.source, c.data.objective = "", "supervised"
    c.data.inputs_length, c.data.targets_length = 16, 12
    c.interventions = ({"kind": "ablate", "layer": 0, "head": 1},)
    model_cfg = config_lib.model_config(c)
    assert config_lib.interventions(c, model_cfg)  # a valid clamp for this model
    for name, clamps in (("clamped", c.interventions), ("plain", ())):
        c.interventions = clamps
        (tmp_path / name).mkdir()
        cfg = loop.resolved_config(c, model_cfg, {})
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    settings = EvalSettings(**SMALL)
    warnings = []
    ev = evaluator.Evaluator(tmp_path / "clamped", settings, warn=warnings.append)
    assert ev.pairs is not None and ev.downstream_unclamped
    (line,) = warnings
    assert "1 attention clamp(s)" in line and "downstream_unclamped=true" in line
    assert "\n" not in line
    ev.writer.close()  # one writer per results file
    quiet = evaluator.Evaluator(
        tmp_path / "plain", settings, warn=warnings.append
    ).downstream_unclamped
    none = downstream.DownstreamSettings(examples=0)
    off = evaluator.Evaluator(
        tmp_path / "clamped", settings, warn=warnings.append, downstream_settings=none
    ).downstream_unclamped
    assert not quiet and not off and len(warnings) == 1
    # One committed-steps helper for the trainer, the evaluator and launch/status.py.
    assert evaluator.committed_steps is checkpointing.committed_steps
