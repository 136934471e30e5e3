"""The local backend for real: a 2-run tiny sweep with the real trainer and evaluator.

Ctrl-C (SIGINT) stops the children cleanly (runs marked `stopped`); re-submitting
resumes both runs to completion with watching evaluators; a third submission is a no-op.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("repeat_scaling.train.loop", reason="the trainer has not landed yet")
pytest.importorskip("repeat_scaling.evaluate", reason="the evaluator has not landed yet")

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from repeat_scaling.train.config import adamw, default_config, model_fields

def get_config(arg="tiny"):
    c = default_config()
    c.model = model_fields("dec_tiny")
    c.data.source = "text:" + {text!r}
    c.data.vocab = "byte"
    c.data.store = {store!r}
    c.data.objective = "causal_lm"
    c.data.length = 32
    c.train.steps, c.train.batch_size, c.train.log_every = 12, 8, 2
    c.train.checkpoint_every, c.train.keep = 6, 3
    c.train.progress_bar = "off"
    adamw(c, lr=3e-3, warmup=2, schedule="cosine")
    c.sweep = [{{"data.repeated_fraction": 0.0, "data.repeated_epochs": 1}},
               {{"data.repeated_fraction": 0.5, "data.repeated_epochs": 2}}]
    return c
"""

EVAL_CONFIG = (
    "--eval_flag=--eval_config=test_batches=1,memorisation_examples=8,copy_examples=2,"
    "random_repeat_examples=2,icl_examples=2,probe_sequences=2,frequency_tokens=10000"
)
NAMES = ["dec_tiny_f0_e1_s0", "dec_tiny_f50_e2_s0"]


def _launch_json(root, name):
    return json.loads((root / name / "launch.json").read_text())


@pytest.mark.slow
def test_local_sweep_interrupt_resume_and_noop(tmp_path, shared_data):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        CONFIG.format(
            text=str(shared_data / "tinyshakespeare" / "input.txt"),
            store="store",  # relative: to the directory submit.py runs from
        )
    )
    root = tmp_path / "root"
    # Run from the config's own directory (outside the repository), relative paths.
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--config=tiny.py", "--root=root",
           "--parallel=2", "--eval_mode=after", "--grace_s=60", EVAL_CONFIG]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each

    # 1. Start, then Ctrl-C once both trainers are up: children get SIGTERM, runs stop.
    # (without the compilation cache, whose programs would let a run finish in between)
    cold = {**env, "REPEAT_SCALING_COMPILATION_CACHE": "off"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cold, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if all((root / n / "config.json").exists() for n in NAMES):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "stopping 2 run(s)" in out
    for name in NAMES:
        record = _launch_json(root, name)
        assert record["state"] == "stopped"
        for pid in (record["train_pid"],):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the children are gone
    status = subprocess.run([sys.executable, "launch/status.py", f"--root={root}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0
    assert all(" stopped " in line for line in status.stdout.splitlines()[:2]), status.stdout

    # The relative store was prepared under the submitting directory, recorded absolute.
    assert (tmp_path / "store" / "manifest.json").is_file()
    for name in NAMES:
        recorded = json.loads((root / name / "config.json").read_text())
        assert recorded["data"]["store"] == str(tmp_path / "store")

    # 2. Re-submit (evaluators now watching beside the trainers): both runs resume, train
    # to step 12 and are evaluated.
    cmd = [c.replace("--eval_mode=after", "--eval_mode=watch") for c in cmd]
    cmd.append("--eval_flag=--poll_seconds=1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 run(s) done, 0 failed" in done.stdout
    for name in NAMES:
        assert _launch_json(root, name)["state"] == "done"
        results = [json.loads(x) for x in (root / name / "eval/results.jsonl").read_text().split()]
        assert results[-1]["step"] == 12 and results[-1]["test_loss"] > 0
        assert (root / name / "logs" / "train.log").read_text().count("\n=== ") == 2
    status = subprocess.run([sys.executable, "launch/status.py", f"--root={root}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = status.stdout.splitlines()
    assert lines[-1] == "2 runs: 2 done"
    assert lines[0].startswith("dec_tiny_f0_e1_s0") and "12/12" in lines[0]

    # 3. Re-submit again: nothing runs, nothing changes.
    before = {n: _launch_json(root, n) for n in NAMES}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == [
        "[local] skip dec_tiny_f0_e1_s0 (done)",
        "[local] skip dec_tiny_f50_e2_s0 (done)",
        "[local] nothing to do",
    ]
    assert {n: _launch_json(root, n) for n in NAMES} == before

    # 4. A command-line override that changes what is trained is in every run's name
    # (one that may change on resume, here train.steps, is not): new workdirs.
    named = subprocess.run(cmd + ["--config.data.length=16", "--config.train.steps=20",
                                  "--dry_run"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert f"--workdir={root}/dec_tiny_f0_e1_s0_length16 " in named.stdout, named.stdout
    assert f"--workdir={root}/dec_tiny_f50_e2_s0_length16 " in named.stdout, named.stdout
    # The same run names from a base config file that differs outside the sweep would
    # land in these workdirs: refused before anything starts, naming the key.
    cfg.write_text(cfg.read_text().replace("c.data.length = 32", "c.data.length = 16"))
    other = subprocess.run(cmd, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        f"error: run {NAMES[0]}: {root / NAMES[0]} holds a run trained with another config "
        "(data.length: 32 (recorded) vs 16 (now)); submit this sweep under another --root"
    ]
    assert {n: _launch_json(root, n) for n in NAMES} == before
