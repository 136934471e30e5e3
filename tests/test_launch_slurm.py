"""The slurm backend against a real SLURM: munged, slurmctld and slurmd on localhost.

A module fixture starts the three daemons from a slurm.conf in a tmp dir (one CPU-only
node, no cgroups); the tests submit through `launch/submit.py --backend=slurm` exactly as
docs/launching.md shows, with `--slurm_gpus_per_node=0` (a CPU job; everything else is the GPU
path's script): two tasks join one jax.distributed job (gloo), train and checkpoint,
`scancel --signal=TERM` requeues the job, which resumes exactly, and the watching
evaluator job follows it to the end. The multi-node GPU layout (2 nodes x 8 GPUs) is
asserted from the environment jax sees, with two real processes.

SLURM comes from `.ci/install_slurm.sh` (run by `.ci/run`); without it the tests fail in
CI and where apt-get could install it, and skip only elsewhere.
"""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from repeat_scaling.train import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd")
TOOLS += ("munged",)
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

# ------------------------------------------------------------------------------------
# The layout: every GPU of every node (no SLURM needed)
# ------------------------------------------------------------------------------------
TWO_NODES_8_GPUS = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_GPUS_ON_NODE": "8",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    "SLURM_LOCALID": "0",
}


def test_slurm_layout_one_task_per_node_gets_all_its_gpus():
    for i in range(2):
        env = dict(TWO_NODES_8_GPUS, SLURM_PROCID=str(i), SLURM_NODEID=str(i))
        assert distributed.slurm_layout(env) == distributed.SlurmLayout(
            "gpu01:61586", 2, i, [0, 1, 2, 3, 4, 5, 6, 7]
        )  # jax's own detection: ('gpu01:61586', 2, i, [0]), one GPU per node


def test_slurm_layout_one_task_per_gpu_and_cpu_jobs():
    per_gpu = dict(TWO_NODES_8_GPUS, SLURM_NTASKS="16", SLURM_STEP_TASKS_PER_NODE="8(x2)")
    per_gpu.update(SLURM_PROCID="11", SLURM_NODEID="1", SLURM_LOCALID="3")
    # Every task sees the node's 8 GPUs: task 3 of the node takes GPU 3.
    assert distributed.slurm_layout(per_gpu).local_device_ids == [3]
    # SLURM bound one GPU to the task (--gpus-per-task=1): it is CUDA's device 0 there.
    bound = dict(per_gpu, CUDA_VISIBLE_DEVICES="3")
    assert distributed.slurm_layout(bound).local_device_ids == [0]
    two_each = dict(per_gpu, SLURM_NTASKS="8", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_PROCID="7")
    assert distributed.slurm_layout(two_each).local_device_ids == [6, 7]
    cpu = {
        k: v for k, v in per_gpu.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")
    }
    assert distributed.slurm_layout(cpu) == distributed.SlurmLayout("gpu01:61586", 16, 11, None)
    port = dict(cpu, JAX_COORDINATOR_PORT="1234", SLURM_STEP_NODELIST="a-3,b")
    assert distributed.slurm_layout(port).coordinator_address == "a-3:1234"


def test_slurm_layout_errors_are_one_line():
    env = dict(TWO_NODES_8_GPUS, SLURM_PROCID="0", SLURM_NODEID="0")
    cases = [
        (dict(env, SLURM_PROCID="2"), r"SLURM_PROCID=2; expected in \[0, SLURM_NTASKS=2\)"),
        (dict(env, SLURM_NTASKS="two"), r"SLURM_NTASKS='two'; expected an integer"),
        (dict(env, SLURM_STEP_TASKS_PER_NODE="3(x2)"), r"8 GPUs on this node for 3 tasks"),
        (dict(env, SLURM_STEP_TASKS_PER_NODE="x"), r"SLURM_STEP_TASKS_PER_NODE='x'"),
        ({k: v for k, v in env.items() if k != "SLURM_PROCID"}, r"SLURM_PROCID is not set"),
    ]
    for bad, message in cases:
        with pytest.raises(distributed.LayoutError, match=message) as e:
            distributed.slurm_layout(bad)
        assert "\n" not in str(e.value)
    assert distributed.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert distributed.first_host("n[1-2]-ib") == "n1-ib"


SIMULATED = r"""
import dataclasses, json, jax
from repeat_scaling import sharding
from repeat_scaling.train import distributed
layout = distributed.slurm_layout()
assert distributed.initialize()
mesh = sharding.make_mesh({"data": -1})
print(json.dumps(dict(
    layout=dataclasses.asdict(layout), processes=jax.process_count(),
    index=jax.process_index(), local=jax.local_device_count(), mesh=int(mesh.devices.size),
    cuda_visible_devices=jax.config.read("jax_cuda_visible_devices"),
)))
"""


def _coordinator_job_id() -> int:
    """A SLURM job id whose coordinator port (as jax derives it) is free here."""
    for port in range(61440 + os.getpid() % 4000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        return 4096 * 7 + port - 61440
    raise RuntimeError("no free port in 61440-65535")


def test_two_nodes_of_8_gpus_give_16_devices_in_the_mesh(tmp_path):
    """Two real processes in the environment srun gives the tasks of a 2-node x 8-GPU job
    (CPU devices stand in for the GPUs): jax.distributed joins them with each process's
    8 local devices, CUDA restricted to all 8 of its node's GPUs, 16 in the mesh."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
    base.update(TWO_NODES_8_GPUS, SLURM_STEP_NODELIST="localhost", JAX_PLATFORMS="cpu")
    base.update(SLURM_JOB_ID=str(_coordinator_job_id()))
    base["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SIMULATED],
            cwd=REPO,
            env=dict(base, SLURM_PROCID=str(i), SLURM_NODEID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got == {
            "layout": {
                "coordinator_address": f"localhost:{int(base['SLURM_JOB_ID']) % 4096 + 61440}",
                "num_processes": 2,
                "process_id": i,
                "local_device_ids": list(range(8)),
            },
            "processes": 2,
            "index": i,
            "local": 8,
            "mesh": 16,
            "cuda_visible_devices": "0,1,2,3,4,5,6,7",
        }


# ------------------------------------------------------------------------------------
# A real SLURM on localhost
# ------------------------------------------------------------------------------------
SLURM_CONF = """\
ClusterName=rstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
FirstJobId={first_job}
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# cred_expire=5: a requeued job may start again 6 s later (default 121 s);
# sched_interval=1: the scheduler then starts it within a second (default 60 s);
# CPUs=8 with config_overrides: 2 trainer tasks and the evaluator fit on a 2-core machine.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Slurm:
    dir: pathlib.Path
    env: dict

    def run(self, *argv: str, timeout: float = 30) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{shlex.join(argv)}: exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_done(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in DONE_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted(self.dir.glob("*.log"))
        )


def _require_slurm() -> dict:
    """The paths of SLURM's tools; fails (CI, or apt-get could install them) or skips."""
    tools = {t: shutil.which(t, path=SEARCH_PATH) for t in TOOLS}
    missing = sorted(t for t, path in tools.items() if path is None)
    if missing:
        msg = f"SLURM is not installed (no {', '.join(missing)}): run `bash .ci/install_slurm.sh`"
        if os.environ.get("CI") or shutil.which("apt-get"):
            pytest.fail(msg + " as root")
        pytest.skip(msg + " (needs apt-get)")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("slurmd must run as root to start jobs")
        pytest.skip("slurmd must run as root to start jobs")
    return tools


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tools = _require_slurm()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = d / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=socket.gethostname().split(".")[0],
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            dir=d,
            first_job=1000 + os.getpid() % 50000,
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    daemons = []

    def start(name, *argv):
        log = open(d / f"{name}.out", "w")  # noqa: SIM115
        daemons.append(
            subprocess.Popen([tools[name], *argv], env=env, stdout=log, stderr=log, cwd=d)
        )
        log.close()

    cluster = Slurm(d, env)
    try:
        start("munged", "-F", "-f", f"--key-file={key}", f"--socket={d}/munge.socket",
              f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
              f"--seed-file={d}/munged.seed")  # fmt: skip
        deadline = time.monotonic() + 20
        while not (d / "munge.socket").exists():
            assert time.monotonic() < deadline, "munged did not start:\n" + cluster.logs()
            time.sleep(0.1)
        start("slurmctld", "-D")
        start("slurmd", "-D", "-N", "localhost")
        while True:
            try:
                state = cluster.run("sinfo", "--noheader", "--format=%T", timeout=10).strip()
            except (RuntimeError, subprocess.TimeoutExpired):
                state = ""
            if state == "idle":
                break
            assert time.monotonic() < deadline + 20, f"node {state!r}:\n" + cluster.logs()
            time.sleep(0.3)
        yield cluster
    finally:
        try:
            jobs = cluster.run("squeue", "--noheader", "--format=%i").split()
            if jobs:
                cluster.run("scancel", *jobs)
            deadline = time.monotonic() + 20
            while cluster.run("squeue", "--noheader").strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        for p in reversed(daemons):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from repeat_scaling.prepare import prepare_store

    out = tmp_path_factory.mktemp("store") / "builtin-byte"
    prepare_store("builtin", "byte", str(out), progress=False, log=lambda *_: None)
    return out


STEPS = 30
RUN = "dec_tiny_f0_e1_s0"
#: The docs' run with the tiny settings below: the command line's overrides that change
#: what is trained are in its name.
TINY_RUN = RUN + "_length64_b8"
EVAL_FLAG = (
    "--eval_flag=--eval_config=test_batches=1,memorisation_examples=8,copy_examples=2,"
    "random_repeat_examples=2,icl_examples=2,probe_sequences=2,frequency_tokens=10000"
)


def readme_commands() -> list[list[str]]:
    """The `launch/submit.py` commands of docs/launching.md's "On SLURM" section: GPU, CPU."""
    text = (REPO / "docs" / "launching.md").read_text()
    section = text[text.index("### On SLURM") :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    commands = [shlex.split(b.replace("\\\n", " ")) for b in blocks]
    return [c for c in commands if c[:2] == ["python", "launch/submit.py"]]


def _readme_command(index: int, root) -> list[str]:
    """docs/launching.md command `index` run with this interpreter under `root`."""
    cmd = [sys.executable, *readme_commands()[index][1:]]
    return [f"--root={root}" if a.startswith("--root=") else a for a in cmd]


def test_readme_gpu_command_layout(tmp_path):
    """The docs' GPU command (dry run): 2 nodes, one task of 8 GPUs each, requeue."""
    cmd = _readme_command(0, tmp_path) + ["--dry_run", "--only=d85m_f0_*"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (script,) = tmp_path.glob("*/slurm/train.sbatch")
    lines = script.read_text().splitlines()
    for line in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue"]:
        assert f"#SBATCH {line}" in lines
    assert "#SBATCH --signal=TERM@120" in lines and "source .venv/bin/activate" in lines
    assert (
        f"sbatch --parsable --dependency=after:$TRAIN_JOB_ID {script.parent}/eval.sbatch "
        "$TRAIN_JOB_ID" in proc.stdout
    )


def _submit(slurm, root, store, *extra) -> tuple[str, list[str]]:
    """The docs' CPU command with a tiny run added; returns its output and the ids
    of the jobs it submitted."""
    cmd = _readme_command(1, root) + [
        "--slurm_poll_seconds=1", f"--config.data.store={store}", "--config.data.source=",
        "--config.data.length=64", "--config.train.batch_size=8",
        f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10",
        "--config.train.log_every=1", "--config.train.progress_bar=off", EVAL_FLAG,
        "--eval_flag=--poll_seconds=1", *extra,
    ]  # fmt: skip
    assert f"--only={RUN}" in cmd and "--slurm_gpus_per_node=0" in cmd, cmd
    cmd = [f"--only={TINY_RUN}" if a == f"--only={RUN}" else a for a in cmd]
    env = dict(slurm.env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, re.findall(r"^Submitted batch job (\d+)$", proc.stdout, re.M)


def _log(path: pathlib.Path) -> str:
    """A job log without absl's I/W lines (orbax and jax are chatty)."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(line for line in lines if not re.match(r"[IW]\d{4} ", line))


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "train" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    losses = {d["step"]: d["loss"] for d in steps}
    assert len(losses) == len(steps), "a step was logged twice"
    return losses


def test_two_tasks_train_requeue_resume_and_evaluate(slurm, store, tmp_path):
    root = tmp_path / "root"
    out, jobs = _submit(slurm, root, store)
    assert len(jobs) == 2, out
    train_job, eval_job = jobs
    w = root / TINY_RUN
    train_log, eval_log = w / "logs" / f"slurm-train-{train_job}.out", w / "logs"
    script = (w / "slurm" / "train.sbatch").read_text()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))

    # The same command in one process with the same 4 devices: the reference losses.
    argv = shlex.split(srun.removesuffix(" || status=$?"))[2:]
    argv = [a if not a.startswith("--workdir=") else f"--workdir={tmp_path / 'ref'}" for a in argv]
    ref = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )  # fmt: skip

    # Preempt the trainers once they are training: SIGTERM to both tasks.
    deadline = time.monotonic() + 150
    metrics = w / "train" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        state = slurm.job(train_job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"{state}\n{_log(train_log)}\n{slurm.logs()}"
        assert time.monotonic() < deadline, f"no training steps:\n{_log(train_log)}"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=TERM", train_job)

    info = slurm.wait_done(train_job, timeout=240)
    log = _log(train_log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"
    m = re.search(r"preempted \(SIGTERM\): saved checkpoint at step (\d+)", log)
    assert m and f"trainer preempted (exit 143): requeueing job {train_job}" in log, log
    saved = int(m.group(1))
    assert 2 <= saved < STEPS, log
    assert f"done: step {STEPS} (resumed from {saved})" in log, log
    # Both tasks joined one jax.distributed job: one process per task, 2 devices each.
    config = json.loads((w / "config.json").read_text())
    assert (config["derived"]["num_processes"], config["derived"]["num_devices"]) == (2, 4)

    # The watching evaluator followed the run through the requeue, to its final step.
    info = slurm.wait_done(eval_job, timeout=120)
    elog = _log(eval_log / f"slurm-eval-{eval_job}.out")
    assert info["JobState"] == "COMPLETED", f"{info}\n{elog}"
    evaluated = [json.loads(line)["step"] for line in (w / "eval" / "results.jsonl").open()]
    assert {10, saved, STEPS} <= set(evaluated) and len(set(evaluated)) == len(evaluated)

    # The resumed run continues exactly as the uninterrupted one.
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    want, got = _losses(tmp_path / "ref"), _losses(w)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-5), step


def test_evaluator_job_ends_when_training_fails(slurm, store, tmp_path):
    """A trainer that fails (here: no store) ends its evaluator jobs: the watching one
    stops following it, `after`'s dependency can never be met and SLURM cancels it."""
    watch_out, (train_w, eval_w) = _submit(
        slurm, tmp_path / "watch", store, f"--config.data.store={tmp_path}/none"
    )
    after_out, (train_a, eval_a) = _submit(
        slurm, tmp_path / "after", store, f"--config.data.store={tmp_path}/none",
        "--eval_mode=after",
    )  # fmt: skip
    for job in (train_w, train_a):
        assert slurm.wait_done(job, timeout=120)["JobState"] == "FAILED"
    info = slurm.wait_done(eval_w, timeout=60)
    elog = _log(tmp_path / "watch" / TINY_RUN / "logs" / f"slurm-eval-{eval_w}.out")
    assert f"training job {train_w} ended (FAILED): last evaluation pass" in elog, elog
    assert "error: " in elog and info["JobState"] == "FAILED", f"{info}\n{elog}"
    info = slurm.wait_done(eval_a, timeout=60)
    assert info["JobState"] == "CANCELLED" and "Dependency" in info["Reason"], info
