"""Workdir URLs: gs:// is accepted (tests/test_workdir_gcs.py runs it for real); other
schemes, and gs:// roots for backends that need a file system, are one-line errors (never a
local 'gs:' or 's3:' directory). Plus the local side of repeat_scaling.workdir_io."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from repeat_scaling import workdir_io

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-m", "repeat_scaling.train", f"--config={DEMO}", "--workdir=s3://bucket/run"],
         "--workdir='s3://bucket/run': unsupported URL scheme"),
        (["-m", "repeat_scaling.evaluate", "--workdir=s3://bucket/run"],
         "--workdir='s3://bucket/run': unsupported URL scheme"),
        ([str(REPO / "launch/submit.py"), f"--config={DEMO}", "--root=gs://bucket/sweep",
          "--dry_run"],
         "--root='gs://bucket/sweep': the local backend needs a local or shared file-system"),
        ([str(REPO / "launch/submit.py"), f"--config={DEMO}", "--root=s3://bucket/sweep",
          "--backend=tpu", "--dry_run"],
         "--root='s3://bucket/sweep': expected a path or a gs://BUCKET/PATH URL"),
        ([str(REPO / "launch/status.py"), "--root=s3://bucket/sweep"],
         "--root='s3://bucket/sweep': unsupported URL scheme"),
    ],
    ids=["train", "evaluate", "submit-local-gs", "submit-s3", "status-s3"],
)  # fmt: skip
def test_unsupported_url_is_a_one_line_error(args, needle, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "s3:").exists()


def test_tpu_dry_run_passes_the_gs_workdir_straight_through(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/submit.py", f"--config={DEMO}:sweep", "--backend=tpu",
         "--root=gs://bucket/sweep", "--only=dec_micro_f0_e1_s0", "--dry_run",
         "--tpu_zone=us-central2-b", "--tpu_accelerator_type=v4-8",
         "--tpu_runtime_version=tpu-ubuntu2204-base"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    train = [x for x in proc.stdout.splitlines() if "repeat_scaling.train" in x]
    assert train == [
        "gcloud compute tpus tpu-vm ssh rs-dec-micro-f0-e1-s0 --zone=us-central2-b --worker=all "
        "'--command=cd ~/repeat_scaling && .venv/bin/python -m repeat_scaling.train "
        "--config=configs/demo.py:sweep --workdir=gs://bucket/sweep/dec_micro_f0_e1_s0 "
        "--config.data.repeated_fraction=0.0 --config.data.repeated_epochs=1'"
    ]
    evaluate = [x for x in proc.stdout.splitlines() if "repeat_scaling.evaluate" in x]
    assert len(evaluate) == 1 and "--workdir=gs://bucket/sweep/dec_micro_f0_e1_s0" in evaluate[0]
    assert "gcsfuse" not in proc.stdout


def test_local_workdir_io(tmp_path):
    wd = workdir_io.workdir_path(os.path.relpath(tmp_path / "run"))
    assert isinstance(wd, pathlib.Path) and wd.is_absolute()
    assert wd.resolve() == (tmp_path / "run").resolve()
    workdir_io.write_json_atomic(wd / "config.json", {"b": 1, "a": 2})  # creates parents
    assert json.loads((wd / "config.json").read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in wd.iterdir()) == ["config.json"]  # no .tmp left behind
    assert workdir_io.read_text(wd / "nope") is None
    app = workdir_io.JsonlAppender(wd / "train" / "metrics.jsonl", flush_seconds=3600)
    app.write_line('{"step": 1}')
    assert (wd / "train" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # at once locally
    app.close()
    workdir_io.append_line(wd / "train" / "metrics.jsonl", '{"step": 2}')
    assert (wd / "train" / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 1}',
        '{"step": 2}',
    ]
    assert workdir_io.check_workdir(str(tmp_path)) == tmp_path
    with pytest.raises(workdir_io.WorkdirError, match="data.store='gs://b/s' is a URL"):
        workdir_io.require_local("gs://b/s", "data.store")
    with pytest.raises(workdir_io.WorkdirError, match="unsupported URL scheme"):
        workdir_io.workdir_path("hdfs://x/y")
