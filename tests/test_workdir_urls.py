"""Object-store URLs as workdirs are refused up front with one line (never a local 'gs:' dir)."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "repeat_scaling.train", f"--config={DEMO}", "--workdir=gs://bucket/run"],
        ["-m", "repeat_scaling.evaluate", "--workdir=gs://bucket/run"],
        [
            str(REPO / "launch/submit.py"),
            f"--config={DEMO}",
            "--root=gs://bucket/sweep",
            "--dry_run",
        ],
    ],
    ids=["train", "evaluate", "submit"],
)
def test_url_workdir_is_a_one_line_error(args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "gs://bucket" in err[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "gs:").exists()
