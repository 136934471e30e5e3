"""The tpu and slurm backends against a fake `gcloud` / `sbatch` that record their argv."""

import io
import json
import os
import subprocess
import sys
import tarfile

import ml_collections
import pytest

from launch.backends import Submission
from launch.backends.slurm import SlurmBackend, SlurmOptions
from launch.backends.tpu import DEFAULT_SETUP, TpuBackend, TpuOptions, node_name
from repeat_scaling import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = r"""#!{python}
import json, os, sys
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\n")
args = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "sbatch":
    print(1000 + sum(1 for _ in open(log)))
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"] or args[:2] == ["storage", "cat"]:
    sys.exit(1)  # no such node / no results yet
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
"""


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """Puts fake gcloud and sbatch first on PATH; returns a function reading their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch"):
        (bin_dir / name).write_text(FAKE.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return calls


def _config(steps=1000):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "d25m"})
    c.data = ml_collections.ConfigDict({"repeated_fraction": 0.0, "repeated_epochs": 1})
    c.train = ml_collections.ConfigDict({"steps": steps})
    c.sweep = [
        {"data.repeated_fraction": 0.1, "data.repeated_epochs": 100},
        {"data.repeated_fraction": 0.0, "data.repeated_epochs": 1},
    ]
    return c


SUB = dict(config_file="configs/hernandez2022.py", config_arg="paper", python="python3")
ZONE = ["--zone=us-central2-b", "--project=proj"]
PYCHECK = (
    'cd ~/repeat_scaling && {py} -c \'import sys; print("python", sys.version.split()[0]); '
    "sys.exit(0 if sys.version_info >= (3, 11) else 3)'"
)


def test_tpu_commands_executed(fake_cli, tmp_path):
    (run,) = sweeps.expand(_config(), "gs://bkt/sweep", only="*_f10_*")
    opts = TpuOptions(
        zone="us-central2-b", accelerator_type="v4-32", runtime_version="tpu-ubuntu2204-base",
        project="proj", spot=True, tarball=str(tmp_path / "code.tgz"),
        log_dir=str(tmp_path / "logs"),
    )  # fmt: skip
    out = io.StringIO()
    code = TpuBackend(opts, out=out).submit(Submission(**SUB, eval_mode="after"), [run])
    assert code == 0, out.getvalue()
    node = "rs-d25m-f10-e100-s0"
    assert node_name("rs", run.name) == node
    workdir = "gs://bkt/sweep/d25m_f10_e100_s0"
    train = (
        "cd ~/repeat_scaling && python3 -m repeat_scaling.train "
        f"--config=configs/hernandez2022.py:paper --workdir={workdir} "
        "--config.data.repeated_fraction=0.1 --config.data.repeated_epochs=100"
    )
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert fake_cli() == [
        ["gcloud", "storage", "cat", f"{workdir}/eval/results.jsonl"],
        [*tpu, "describe", node, *ZONE, "--format=value(state)"],
        [*tpu, "create", node, *ZONE, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot"],
        # python3 is the runtime's own interpreter: checked before the setup installs into it
        [*tpu, "ssh", node, *ZONE, "--worker=all", f"--command={PYCHECK.format(py='python3')}"],
        [*tpu, "scp", str(tmp_path / "code.tgz"), f"{node}:/tmp/repeat_scaling.tar.gz", *ZONE,
         "--worker=all"],
        [*tpu, "ssh", node, *ZONE, "--worker=all",
         "--command=mkdir -p ~/repeat_scaling && tar -xzf /tmp/repeat_scaling.tar.gz -C "
         f"~/repeat_scaling && cd ~/repeat_scaling && {DEFAULT_SETUP}"],
        [*tpu, "ssh", node, *ZONE, "--worker=all", f"--command={train}"],
        [*tpu, "ssh", node, *ZONE, "--worker=0",
         "--command=cd ~/repeat_scaling && JAX_PLATFORMS=cpu python3 -m "
         f"repeat_scaling.evaluate --workdir={workdir}"],
        [*tpu, "delete", node, *ZONE, "--quiet"],
    ]  # fmt: skip
    with tarfile.open(tmp_path / "code.tgz") as tar:
        names = tar.getnames()
    assert "launch/submit.py" in names and "setup.py" in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_tpu_queued_resources_eval_vm(fake_cli, tmp_path):
    (run,) = sweeps.expand(_config(), "gs://bkt/sweep", only="*_f0_*")
    opts = TpuOptions(
        zone="us-central2-b", accelerator_type="v5litepod-64", runtime_version="v2-alpha-tpuv5-lite",
        queued=True, eval_on="vm", name_prefix="exp", tarball=str(tmp_path / "code.tgz"),
        log_dir=str(tmp_path / "logs"), poll_s=0.01,
    )  # fmt: skip
    sub = Submission(**{**SUB, "python": ".venv/bin/python"}, eval_mode="after")
    assert TpuBackend(opts, out=io.StringIO()).submit(sub, [run]) == 0
    calls = [c[1:6] for c in fake_cli()]
    node, qr = "exp-d25m-f0-e1-s0", "exp-d25m-f0-e1-s0-qr"
    assert (
        calls
        == [
            ["storage", "cat", "gs://bkt/sweep/d25m_f0_e1_s0/eval/results.jsonl"],
            ["compute", "tpus", "tpu-vm", "describe", node],
            ["compute", "tpus", "queued-resources", "create", qr],
            ["compute", "tpus", "queued-resources", "describe", qr],
            ["compute", "tpus", "tpu-vm", "scp", str(tmp_path / "code.tgz")],
            ["compute", "tpus", "tpu-vm", "ssh", node],  # setup
            ["compute", "tpus", "tpu-vm", "ssh", node],  # Python >= 3.11
            ["compute", "tpus", "tpu-vm", "describe", f"{node}-eval"],
            ["compute", "tpus", "queued-resources", "create", f"{qr[:-3]}-eval-qr"],
            ["compute", "tpus", "queued-resources", "describe", f"{node}-eval-qr"],
            ["compute", "tpus", "tpu-vm", "scp", str(tmp_path / "code.tgz")],
            ["compute", "tpus", "tpu-vm", "ssh", f"{node}-eval"],
            ["compute", "tpus", "tpu-vm", "ssh", f"{node}-eval"],
            ["compute", "tpus", "tpu-vm", "ssh", node],  # trainer, every worker
            ["compute", "tpus", "tpu-vm", "ssh", f"{node}-eval"],  # evaluator on its own VM
            ["compute", "tpus", "queued-resources", "delete", qr],
            ["compute", "tpus", "queued-resources", "delete", f"{node}-eval-qr"],
        ]
    )
    full = fake_cli()
    assert full[2][6:] == ["--node-id=exp-d25m-f0-e1-s0", "--zone=us-central2-b",
                           "--accelerator-type=v5litepod-64",
                           "--runtime-version=v2-alpha-tpuv5-lite"]  # fmt: skip
    assert full[6][-1] == "--command=" + PYCHECK.format(py=".venv/bin/python")
    assert "--accelerator-type=v5litepod-1" in full[8]
    assert full[14][-1] == (
        "--command=cd ~/repeat_scaling && .venv/bin/python -m repeat_scaling.evaluate "
        "--workdir=gs://bkt/sweep/d25m_f0_e1_s0"
    )
    assert full[-1][-2:] == ["--force", "--quiet"]


def test_tpu_dry_run_prints_and_runs_nothing(fake_cli, tmp_path):
    runs = sweeps.expand(_config(), "gs://bkt/sweep")
    opts = TpuOptions(zone="z", accelerator_type="v4-8", runtime_version="rt", preemptible=True)
    out = io.StringIO()
    assert TpuBackend(opts, out=out).submit(Submission(**SUB, dry_run=True), runs) == 0
    assert fake_cli() == []
    lines = out.getvalue().splitlines()
    creates = [line for line in lines if " tpu-vm create " in line]
    assert creates == [
        "gcloud compute tpus tpu-vm create rs-d25m-f10-e100-s0 --zone=z --accelerator-type=v4-8 "
        "--version=rt --preemptible",
        "gcloud compute tpus tpu-vm create rs-d25m-f0-e1-s0 --zone=z --accelerator-type=v4-8 "
        "--version=rt --preemptible",
    ]
    evals = [line for line in lines if "repeat_scaling.evaluate" in line]
    assert evals[0].endswith("--workdir=gs://bkt/sweep/d25m_f10_e100_s0 --watch'")
    assert evals[0] == (
        "gcloud compute tpus tpu-vm ssh rs-d25m-f10-e100-s0 --zone=z --worker=0 "
        "'--command=cd ~/repeat_scaling && until gcloud storage ls "
        "gs://bkt/sweep/d25m_f10_e100_s0/config.json >/dev/null 2>&1; do sleep 30; done && "
        "JAX_PLATFORMS=cpu python3 -m repeat_scaling.evaluate "
        "--workdir=gs://bkt/sweep/d25m_f10_e100_s0 --watch'"
    )
    assert sum(" delete " in line for line in lines) == 2


def test_tpu_options_are_checked():
    with pytest.raises(ValueError, match="--tpu_zone"):
        TpuOptions(zone="", accelerator_type="v4-8", runtime_version="rt")
    with pytest.raises(ValueError, match="exclusive"):
        TpuOptions(zone="z", accelerator_type="a", runtime_version="r", spot=True, preemptible=True)
    long = node_name("rs", "t5_base_moe8_f100_e256_s0_do0p1_from262144_ls0p1_dp0p1")
    assert len(long) <= 50 and long.startswith("rs-t5-base-moe8-f100")


def test_slurm_scripts_and_sbatch(fake_cli, tmp_path):
    root = tmp_path / "root"
    runs = sweeps.expand(_config(steps=200), str(root))
    # The second run already trained (final checkpoint committed): only its evaluator.
    (root / runs[1].name / "checkpoints" / "200").mkdir(parents=True)
    opts = SlurmOptions(nodes=4, gpus_per_node=8, cpus_per_task=32, time="2:00:00",
                        partition="gpu", account="lab", setup=("source .venv/bin/activate",),
                        cwd="/src/repeat_scaling")  # fmt: skip
    sub = Submission(**SUB, eval_mode="watch")
    assert SlurmBackend(opts, out=io.StringIO()).submit(sub, runs) == 0
    w0, w1 = root / runs[0].name, root / runs[1].name
    assert fake_cli() == [
        ["sbatch", "--parsable", str(w0 / "slurm" / "train.sbatch")],
        ["sbatch", "--parsable", "--dependency=after:1001", str(w0 / "slurm" / "eval.sbatch"),
         "1001"],
        ["sbatch", "--parsable", str(w1 / "slurm" / "eval.sbatch")],
    ]  # fmt: skip
    assert (w0 / "slurm" / "train.sbatch").read_text().splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=d25m_f10_e100_s0",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --time=2:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        f"#SBATCH --output={w0}/logs/slurm-train-%j.out",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "set -euo pipefail",
        "cd /src/repeat_scaling",
        "source .venv/bin/activate",
        "# Every task passes its process count, process id and GPUs (from the SLURM",
        "# environment) to jax.distributed.initialize.",
        "status=0",
        "srun --kill-on-bad-exit=1 python3 -m repeat_scaling.train "
        f"--config=configs/hernandez2022.py:paper --workdir={w0} "
        "--config.data.repeated_fraction=0.1 --config.data.repeated_epochs=100 || status=$?",
        'if [ "$status" -eq 143 ]; then',
        "  # SIGTERM (time limit near, scancel --signal=TERM): a checkpoint was saved;",
        "  # the requeued job resumes from it.",
        '  echo "trainer preempted (exit 143): requeueing job $SLURM_JOB_ID" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    eval0 = (w0 / "slurm" / "eval.sbatch").read_text().splitlines()
    assert "#SBATCH --nodes=1" in eval0 and "#SBATCH --gpus-per-node=1" in eval0
    assert "#SBATCH --requeue" not in eval0 and "export JAX_PLATFORMS=cpu" not in "".join(eval0)
    watcher = f"srun python3 -m repeat_scaling.evaluate --workdir={w0} --watch &"
    last_pass = f"  exec srun python3 -m repeat_scaling.evaluate --workdir={w0}"
    assert watcher in eval0 and last_pass in eval0
    assert 'train_job="${1:?usage: sbatch eval.sbatch TRAIN_JOB_ID}"' in eval0
    eval1 = (w1 / "slurm" / "eval.sbatch").read_text().splitlines()
    assert eval1[-1] == f"srun python3 -m repeat_scaling.evaluate --workdir={w1}"
    assert "#SBATCH --kill-on-invalid-dep=yes" in eval1


def test_slurm_layout_and_cpu_options():
    """Tasks per node and a CPU job (gpus_per_node=0) in the script; bad values refused."""
    opts = SlurmOptions(nodes=2, gpus_per_node=0, tasks_per_node=2, eval_gpus=0, cwd="/r")
    (run,) = sweeps.expand(_config(), "/root", only="*_f10_*")
    script = SlurmBackend(opts).train_script(Submission(**SUB), run).splitlines()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=2" in script
    assert not any("--gpus" in line for line in script)
    assert "export JAX_PLATFORMS=cpu  # a CPU job (no GPUs asked for)" in script
    gpu = SlurmOptions(gpus_per_node=8, tasks_per_node=8)
    assert "#SBATCH --gpus-per-node=8" in SlurmBackend(gpu).train_script(Submission(**SUB), run)
    for bad, message in [
        (dict(gpus_per_node=8, tasks_per_node=3), "--slurm_tasks_per_node=3 does not divide"),
        (dict(tasks_per_node=0), "--slurm_tasks_per_node=0; expected an int >= 1"),
        (dict(gpus_per_node=-1), "--slurm_gpus_per_node=-1; expected an int >= 0"),
        (dict(poll_seconds=0), "--slurm_poll_seconds=0; expected an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            SlurmOptions(**bad)


def test_slurm_through_submit_cli(fake_cli, tmp_path):
    """The real paper config through submit.py: flags, names, one dry run, one real call."""
    root = tmp_path / "sweep"
    cmd = [
        sys.executable, "launch/submit.py", "--config=configs/hernandez2022.py:paper",
        "--backend=slurm", f"--root={root}", "--only=d85m_f10_e100_s0,d85m_f0_*",
        "--slurm_nodes=2", "--slurm_gpus_per_node=4", "--eval_mode=after", "--python=python",
    ]  # fmt: skip
    dry = subprocess.run(cmd + ["--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert fake_cli() == []
    assert f"# 2 run(s) from {REPO}/configs/hernandez2022.py:paper" in dry.stdout
    w = root / "d85m_f0_e1_s0" / "slurm"
    assert f"TRAIN_JOB_ID=$(sbatch --parsable {w}/train.sbatch)\n" in dry.stdout
    assert f"sbatch --parsable --dependency=afterok:$TRAIN_JOB_ID {w}/eval.sbatch\n" in dry.stdout
    real = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert real.returncode == 0, real.stderr
    calls = fake_cli()
    assert [c[2:] for c in calls] == [
        [str(root / "d85m_f0_e1_s0" / "slurm" / "train.sbatch")],
        ["--dependency=afterok:1001", str(root / "d85m_f0_e1_s0" / "slurm" / "eval.sbatch")],
        [str(root / "d85m_f10_e100_s0" / "slurm" / "train.sbatch")],
        ["--dependency=afterok:1003", str(root / "d85m_f10_e100_s0" / "slurm" / "eval.sbatch")],
    ]
    script = (root / "d85m_f10_e100_s0" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=4\n" in script
    assert (
        "srun --kill-on-bad-exit=1 python -m repeat_scaling.train "
        f"--config={REPO}/configs/hernandez2022.py:paper --workdir={root}/d85m_f10_e100_s0 "
        "--config.model.name=d85m --config.model.d_ff=2048 --config.model.d_model=768 "
        "--config.model.num_decoder_layers=12 --config.model.num_heads=12 "
        "--config.data.repeated_fraction=0.1 "
        "--config.data.repeated_epochs=100 --config.seed=0 || status=$?"
    ) in script.splitlines()
