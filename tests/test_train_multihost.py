"""Multi-host for real: two CPU processes on localhost (gloo collectives, 2 devices each)
train like one process with 4 devices, and their checkpoint restores in one process.

The two processes run 3 steps per compiled call (``train.steps_per_call=3``): with
checkpoints every 3 steps and 7 steps, their calls are 3 + 3 stacked steps and one single
step, so both ways of feeding a call run across processes; the one-process reference and
the resumed run take one step per call (bit-identical to 3 in one process)."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(workdir, store_dir, *extra):
    return [
        sys.executable,
        "-m",
        "repeat_scaling.train",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data.store={store_dir}",
        "--config.data.source=",
        "--config.data.length=64",
        "--config.train.batch_size=8",
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=3",
        "--config.train.keep=3",  # 3, 6 and the final 7
        "--config.train.log_every=1",
        "--config.train.progress_bar=off",
        *extra,
    ]


def _env(devices: int, cache) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _losses(workdir) -> dict[int, float]:
    lines = (pathlib.Path(workdir) / "train" / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["loss"] for d in map(json.loads, lines)}


def test_two_processes_match_one_process_and_restore(store_dir, tmp_path):
    spc = "--config.train.steps_per_call=3"
    cache = tmp_path / "cache"
    port = _free_port()
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            _cmd(
                multi,
                store_dir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                spc,
            ),
            cwd=REPO,
            env=_env(2, cache / f"p{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    ref = subprocess.run(
        _cmd(tmp_path / "ref", store_dir),
        cwd=REPO,
        env=_env(4, cache / "single"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert ref.returncode == 0, ref.stderr[-3000:]
    want, got = _losses(tmp_path / "ref"), _losses(multi)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=2e-5), s
    config = json.loads((multi / "config.json").read_text())
    assert config["derived"]["num_processes"] == 2 and config["derived"]["num_devices"] == 4

    assert config["derived"]["steps_per_call"] == 3
    # The two-process checkpoint at step 3 restores in ONE process (4 devices) and the
    # run continues exactly as the single-process reference.
    for step in (6, STEPS):
        shutil.rmtree(multi / "checkpoints" / str(step))
    r = subprocess.run(
        _cmd(multi, store_dir),
        cwd=REPO,
        env=_env(4, cache / "single"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from 3" in r.stderr
    resumed = _losses(multi)
    for s in range(4, STEPS + 1):
        assert resumed[s] == pytest.approx(want[s], rel=2e-5), s
