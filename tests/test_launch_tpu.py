"""The tpu backend's set-up checks against a fake `gcloud`: a Python >= 3.11 on the
workers, the evaluator VM's own zone and runtime, queued resources with spot or
preemptible capacity, the token store on every worker, and docs/launching.md's TPU command
in dry-run form."""

import io
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from launch.backends import Submission
from launch.backends.tpu import DEFAULT_SETUP, TpuBackend, TpuOptions, default_runtime
from repeat_scaling import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records its argv; answers the Python check with $FAKE_PY ("3.10.12": too old) and the
# store check with failure when $FAKE_NO_STORE is set; no node exists, no results yet.
FAKE = r"""#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
command = next((a for a in args if a.startswith("--command=")), "")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"] or args[:2] == ["storage", "cat"]:
    sys.exit(1)
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
if "sys.version_info" in command:
    version = os.environ.get("FAKE_PY", "3.11.9")
    print("python", version)
    sys.exit(0 if tuple(map(int, version.split(".")[:2])) >= (3, 11) else 3)
if "test -f" in command and os.environ.get("FAKE_NO_STORE"):
    sys.exit(1)
"""


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _runs(store="data/stores/c4-t5spm"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "d25m"})
    c.data = ml_collections.ConfigDict(
        {"store": store, "repeated_fraction": 0.0, "repeated_epochs": 1}
    )
    c.train = ml_collections.ConfigDict({"steps": 100})
    return sweeps.expand(c, "gs://bkt/sweep")


def _opts(tmp_path, **kw):
    kw = {"zone": "us-central2-b", "accelerator_type": "v4-32", **kw}
    return TpuOptions(**kw, tarball=str(tmp_path / "code.tgz"), log_dir=str(tmp_path / "logs"))


SUB = dict(config_file="configs/hernandez2022.py", config_arg="paper")


def _commands(calls):
    return [next((a for a in c if a.startswith("--command=")), "") for c in calls]


def test_default_runtime_and_setup_bring_python_311(gcloud, tmp_path):
    assert default_runtime("v4-128") == "tpu-ubuntu2204-base"
    assert default_runtime("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert default_runtime("v5p-8") == "v2-alpha-tpuv5" and default_runtime("v6e-8")
    out = io.StringIO()
    sub = Submission(**SUB, python=".venv/bin/python", eval_mode="none")
    assert TpuBackend(_opts(tmp_path), out=out).submit(sub, _runs()) == 0, out.getvalue()
    calls = gcloud()
    create = next(c for c in calls if c[2:4] == ["tpu-vm", "create"])
    assert "--version=tpu-ubuntu2204-base" in create  # Ubuntu 22.04, Python 3.10 ...
    cmds = _commands(calls)
    setup = next(i for i, c in enumerate(cmds) if "tar -xzf" in c)
    assert cmds[setup].endswith(DEFAULT_SETUP)
    assert "uv venv -q --allow-existing --python 3.11 .venv" in DEFAULT_SETUP  # ... so uv
    check = next(i for i, c in enumerate(cmds) if "sys.version_info" in c)
    train = next(i for i, c in enumerate(cmds) if "repeat_scaling.train" in c)
    assert setup < check < train  # the venv's Python, checked once it exists
    assert cmds[check].startswith("--command=cd ~/repeat_scaling && .venv/bin/python -c ")
    assert "cd ~/repeat_scaling && .venv/bin/python -m repeat_scaling.train" in cmds[train]


def test_old_python_on_the_workers_is_one_line(gcloud, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PY", "3.10.12")
    out = io.StringIO()
    # A system interpreter with a custom setup: checked BEFORE the setup installs into it.
    opts = _opts(
        tmp_path, setup="python3 -m pip install -e .", runtime_version="tpu-ubuntu2204-base"
    )
    sub = Submission(**SUB, python="python3", eval_mode="none")
    assert TpuBackend(opts, out=out).submit(sub, _runs()) == 1
    failed = [x for x in out.getvalue().splitlines() if x.startswith("FAILED")]
    assert failed == [
        "FAILED d25m_f0_e1_s0: rs-d25m-f0-e1-s0: python3 on the workers is Python 3.10.12 "
        "(runtime tpu-ubuntu2204-base); repeat_scaling needs Python >= 3.11: keep the "
        "default --tpu_setup (uv installs Python 3.11 into .venv) or use a runtime whose "
        "python3 is >= 3.11"
    ]
    cmds = _commands(gcloud())
    assert not any("pip install" in c or "repeat_scaling.train" in c for c in cmds)
    assert gcloud()[-1][2:4] == ["tpu-vm", "delete"]


def test_eval_vm_has_its_own_zone_and_runtime(gcloud, tmp_path):
    sub = Submission(**SUB, python=".venv/bin/python", eval_mode="after")
    opts = _opts(tmp_path, eval_on="vm", eval_zone="us-west4-a")  # eval type: v5litepod-1
    assert TpuBackend(opts, out=io.StringIO()).submit(sub, _runs()) == 0
    calls = gcloud()
    ev = [c for c in calls if any(a.startswith("rs-d25m-f0-e1-s0-eval") for a in c)]
    creates = [c for c in ev if c[2:4] == ["tpu-vm", "create"]]
    assert len(creates) == 1 and "--accelerator-type=v5litepod-1" in creates[0]
    assert "--version=v2-alpha-tpuv5-lite" in creates[0]  # the v5e runtime, not v4's
    assert all("--zone=us-west4-a" in c for c in ev) and len(ev) >= 6  # ssh, scp, delete too
    main = [c for c in calls if "rs-d25m-f0-e1-s0" in c]
    assert main and all("--zone=us-central2-b" in c for c in main)
    opts = _opts(tmp_path, eval_on="vm", eval_zone="z2", eval_runtime_version="my-runtime")
    assert (opts.eval_zone, opts.eval_runtime_version) == ("z2", "my-runtime")
    same = _opts(tmp_path, eval_on="vm", eval_accelerator_type="v4-8", runtime_version="rt")
    assert (same.eval_zone, same.eval_runtime_version) == ("us-central2-b", "rt")


def test_queued_preemptible_and_spot_are_both_honoured(tmp_path):
    queued_spot = TpuBackend(_opts(tmp_path, queued=True, spot=True)).create_cmds("n", "v4-8")
    assert queued_spot[0][-1] == "--spot" and queued_spot[0][:4] == [
        "gcloud", "compute", "tpus", "queued-resources"
    ]  # fmt: skip
    queued_pre = TpuBackend(_opts(tmp_path, queued=True, preemptible=True))
    create = queued_pre.create_cmds("n", "v4-8")[0]
    assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
    assert create[-1] == "--best-effort" and "--preemptible" not in create
    cmd = [sys.executable, "launch/submit.py", "--config=configs/hernandez2022.py:paper",
           "--backend=tpu", "--root=gs://b/s", "--tpu_zone=z", "--tpu_accelerator_type=v4-8",
           "--tpu_queued", "--tpu_preemptible", "--dry_run", "--notpu_compile_check"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "queued-resources create" in proc.stdout and "--best-effort" in proc.stdout


def test_missing_store_on_the_workers_is_one_line(gcloud, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NO_STORE", "1")
    out = io.StringIO()
    sub = Submission(**SUB, python=".venv/bin/python", eval_mode="watch")
    assert TpuBackend(_opts(tmp_path), out=out).submit(sub, _runs()) == 1
    failed = [x for x in out.getvalue().splitlines() if x.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(
        "FAILED d25m_f0_e1_s0: run d25m_f0_e1_s0: data.store='data/stores/c4-t5spm' is not "
        "on every worker of rs-d25m-f0-e1-s0 (no ~/repeat_scaling/data/stores/c4-t5spm/"
        "manifest.json)"
    )
    assert failed[0].endswith(
        "copy it down with --tpu_setup_extra='mkdir -p data/stores && gcloud storage cp -r "
        "gs://BUCKET/stores/c4-t5spm data/stores/'"
    )
    cmds = _commands(gcloud())
    assert any("test -f data/stores/c4-t5spm/manifest.json" in c for c in cmds)
    assert not any("repeat_scaling.train" in c or "evaluate" in c for c in cmds)


def test_readme_tpu_example_dry_run(gcloud):
    """docs/launching.md's TPU command (its compile check measured separately: see there)."""
    cmd = [sys.executable, "launch/submit.py", "--config=configs/xue2023.py:paper",
           "--backend=tpu", "--root=gs://my-bucket/xue2023", "--tpu_zone=us-central2-b",
           "--tpu_accelerator_type=v4-128", "--tpu_spot", "--tpu_queued", "--tpu_eval_on=vm",
           "--tpu_eval_accelerator_type=v4-8",
           "--tpu_setup_extra=mkdir -p data/stores && gcloud storage cp -r "
           "gs://my-bucket/stores/c4-t5spm data/stores/",
           "--parallel=4", "--only=t5_base_f0_e1_s0", "--dry_run", "--notpu_compile_check"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert gcloud() == []
    assert (
        "gcloud compute tpus queued-resources create rs-t5-base-f0-e1-s0-qr "
        "--node-id=rs-t5-base-f0-e1-s0 --zone=us-central2-b --accelerator-type=v4-128 "
        "--runtime-version=tpu-ubuntu2204-base --spot"
    ) in out
    assert "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --spot" in out
    assert "uv venv -q --allow-existing --python 3.11 .venv && " in out
    assert "-e . && mkdir -p data/stores && gcloud storage cp -r gs://my-bucket/stores/" in out
    assert "test -f data/stores/c4-t5spm/manifest.json" in out
    assert ".venv/bin/python -m repeat_scaling.train --config=configs/xue2023.py:paper" in out
