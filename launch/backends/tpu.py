"""`tpu` backend: Cloud TPU VMs and pods through the gcloud CLI.

Per run (TPU node `<prefix>-<run name>` with `_` -> `-`), in order:

1. create the node: `gcloud compute tpus tpu-vm create` (on-demand, `--spot` or
   `--preemptible`), or with `queued=True` a queued resource
   (`gcloud compute tpus queued-resources create ... --node-id=NODE`) polled with
   `describe` until ACTIVE. A node that already exists (`tpu-vm describe` succeeds) is
   reused, so re-submitting after a failure resumes on it.
2. copy the code: `tpu-vm scp` of a tarball of the repository to every worker, then
   `tpu-vm ssh --worker=all` to unpack it and `pip install` it with `jax[tpu]`.
3. train: `tpu-vm ssh --worker=all --command='cd ~/repeat_scaling && python3 -m
   repeat_scaling.train ...'` on every worker at once (jax.distributed detects the pod
   itself); the workdir is `ROOT/NAME`. ROOT is normally a gs://BUCKET/PATH URL, passed
   straight to the trainer and evaluator, which read and write it through gcsfs and
   orbax/tensorstore (`repeat_scaling/workdir_io.py`; the VMs' service account needs
   read/write access to the bucket; no gcsfuse). An absolute path that every worker
   shares (e.g. a gcsfuse or NFS mount set up in `setup`) works too.
4. evaluate, beside the trainer (`eval_mode=watch`) or after it (`after`): on worker 0
   on its CPU (`eval_on=worker0`; the trainer holds the TPU chips) or on a separate
   small TPU VM `NODE-eval` (`eval_on=vm`), created, set up and deleted like the
   node.
5. delete the node(s) (`--quiet`; for queued resources `queued-resources delete
   --force`), also after a failure unless `keep_on_failure`.

The launcher stays in the foreground while its runs train (run it under `nohup` or
`tmux`); `parallel` runs proceed at once. With `dry_run` every command is printed
instead (the queued-resource wait loop as one `describe`). Runs whose final step is
already in `ROOT/NAME/eval/results.jsonl` (read with `gcloud storage cat` for gs://,
else from the same path on this machine when it is mounted here too) are skipped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import TextIO

from launch import status as status_lib
from launch.backends import LaunchError, Submission, eval_argv, shell_join, train_argv

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOTE_DIR = "~/repeat_scaling"
REMOTE_TARBALL = "/tmp/repeat_scaling.tar.gz"
# Never shipped with the code: token stores and launcher logs (prepared/written per host).
PACK_EXCLUDE = ("data/stores/", "launch_logs/", "demo_out/")


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    """Flags of the tpu backend (see `submit.py --helpfull`)."""

    zone: str
    accelerator_type: str
    runtime_version: str
    project: str = ""
    spot: bool = False
    preemptible: bool = False
    queued: bool = False
    name_prefix: str = "rs"
    eval_on: str = "worker0"  # worker0 | vm
    eval_accelerator_type: str = "v5litepod-1"
    setup: str = "python3 -m pip install -q -U 'jax[tpu]' -e ."
    keep_on_failure: bool = False
    poll_s: float = 30.0
    log_dir: str = "launch_logs"
    tarball: str = ""  # where the code tarball is written (default: in the temp dir)

    def __post_init__(self):
        for field in ("zone", "accelerator_type", "runtime_version"):
            if not getattr(self, field):
                raise LaunchError(f"--tpu_{field}='' ; the tpu backend needs a value for it")
        if self.spot and self.preemptible:
            raise LaunchError("--tpu_spot and --tpu_preemptible are exclusive; pick one")
        if self.eval_on not in ("worker0", "vm"):
            raise LaunchError(f"--tpu_eval_on={self.eval_on!r}; expected 'worker0' or 'vm'")
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name_prefix):
            raise LaunchError(
                f"--tpu_name_prefix={self.name_prefix!r}; expected lowercase letters, digits "
                "and '-', starting with a letter"
            )


def node_name(prefix: str, run_name: str) -> str:
    """A valid TPU node name for a run (<= 50 chars so `-eval`/`-qr` suffixes fit)."""
    name = f"{prefix}-{run_name}".lower().replace("_", "-")
    name = re.sub(r"[^-a-z0-9]", "-", name).strip("-")
    if len(name) > 50:
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        name = f"{name[:43].rstrip('-')}-{digest}"
    return name


class TpuBackend:
    """Builds and runs the gcloud commands for each run (see the module docstring)."""

    def __init__(self, options: TpuOptions, parallel: int = 1, out: TextIO | None = None):
        if parallel < 1:
            raise LaunchError(f"--parallel={parallel}; expected an int >= 1")
        self.opt, self.parallel = options, parallel
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    # -- command builders -------------------------------------------------------------
    def _common(self) -> list[str]:
        flags = [f"--zone={self.opt.zone}"]
        return flags + ([f"--project={self.opt.project}"] if self.opt.project else [])

    def describe_cmd(self, node: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", node, *self._common(),
                "--format=value(state)"]  # fmt: skip

    def create_cmds(self, node: str, accelerator_type: str) -> list[list[str]]:
        """Create commands: one tpu-vm create, or queued-resource create + describe."""
        lifecycle = ["--spot"] if self.opt.spot else []
        if self.opt.queued:
            return [
                ["gcloud", "compute", "tpus", "queued-resources", "create", f"{node}-qr",
                 f"--node-id={node}", *self._common(), f"--accelerator-type={accelerator_type}",
                 f"--runtime-version={self.opt.runtime_version}", *lifecycle],
                ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{node}-qr",
                 *self._common(), "--format=value(state.state)"],
            ]  # fmt: skip
        if self.opt.preemptible:
            lifecycle = ["--preemptible"]
        return [
            ["gcloud", "compute", "tpus", "tpu-vm", "create", node, *self._common(),
             f"--accelerator-type={accelerator_type}", f"--version={self.opt.runtime_version}",
             *lifecycle],
        ]  # fmt: skip

    def ssh_cmd(self, node: str, worker: str, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self._common(),
                f"--worker={worker}", f"--command={command}"]  # fmt: skip

    def copy_cmds(self, node: str, tarball: str) -> list[list[str]]:
        """scp the code tarball to every worker, unpack it and install it."""
        setup = (
            f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && {self.opt.setup}"
        )
        return [
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:{REMOTE_TARBALL}",
             *self._common(), "--worker=all"],
            self.ssh_cmd(node, "all", setup),
        ]  # fmt: skip

    def train_cmd(self, sub: Submission, run, node: str) -> list[str]:
        return self.ssh_cmd(node, "all", f"cd {REMOTE_DIR} && {shell_join(train_argv(sub, run))}")

    def eval_cmd(self, sub: Submission, run, node: str, watch: bool) -> list[str]:
        argv = shell_join(eval_argv(sub, run, watch=watch))
        if self.opt.eval_on == "worker0":
            # The trainer owns the TPU chips of worker 0: evaluate on its CPU.
            argv = f"JAX_PLATFORMS=cpu {argv}"
        else:
            node = f"{node}-eval"
        steps = [f"cd {REMOTE_DIR}"]
        if watch:  # the evaluator needs the trainer's config.json: wait for it
            steps.append(wait_for_config(run.workdir))
        return self.ssh_cmd(node, "0", " && ".join([*steps, argv]))

    def delete_cmd(self, node: str) -> list[str]:
        if self.opt.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{node}-qr",
                    *self._common(), "--force", "--quiet"]  # fmt: skip
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", node, *self._common(), "--quiet"]

    # -- execution --------------------------------------------------------------------
    def say(self, line: str) -> None:
        with self._lock:
            print(line, file=self.out, flush=True)

    def _run(self, cmd: list[str], dry_run: bool, check: bool = True, log=None) -> int:
        self.say(("" if dry_run else "+ ") + shell_join(cmd))
        if dry_run:
            return 0
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT if log else None)
        if check and proc.returncode != 0:
            raise LaunchError(f"command failed with exit code {proc.returncode}: {cmd[:6]}...")
        return proc.returncode

    def _exists(self, node: str, dry_run: bool) -> bool:
        if dry_run:
            return False
        proc = subprocess.run(self.describe_cmd(node), capture_output=True, text=True)
        return proc.returncode == 0

    def _create(self, node: str, accelerator_type: str, dry_run: bool) -> None:
        if self._exists(node, dry_run):
            self.say(f"# {node} exists: reusing it")
            return
        cmds = self.create_cmds(node, accelerator_type)
        self._run(cmds[0], dry_run)
        if len(cmds) == 1:
            return
        if dry_run:
            self.say(f"# repeat until it prints ACTIVE:\n{shell_join(cmds[1])}")
            return
        while True:
            state = subprocess.run(cmds[1], capture_output=True, text=True).stdout.strip()
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise LaunchError(f"queued resource {node}-qr is {state}")
            time.sleep(self.opt.poll_s)

    def is_done(self, run) -> bool:
        """Whether `run`'s final step is in its eval/results.jsonl (via gcloud storage)."""
        total = run.total_steps
        path = f"{run.workdir}/eval/results.jsonl"
        if total is None:
            return False
        if not run.workdir.startswith("gs://"):
            # A shared mount that this machine may see too (else: not known to be done).
            return status_lib.run_status(run.workdir, total).evaluated
        proc = subprocess.run(["gcloud", "storage", "cat", path], capture_output=True, text=True)
        if proc.returncode != 0:
            return False
        for line in proc.stdout.splitlines():
            try:
                if json.loads(line).get("step") == total:
                    return True
            except (json.JSONDecodeError, AttributeError):
                continue
        return False

    def run_one(self, sub: Submission, run, tarball: str) -> bool:
        """All steps of one run; True on success."""
        node, dry = node_name(self.opt.name_prefix, run.name), sub.dry_run
        nodes = [node] + ([f"{node}-eval"] if self.opt.eval_on == "vm" and sub.eval_mode != "none" else [])  # fmt: skip
        log_dir = pathlib.Path(self.opt.log_dir) / run.name
        if not dry:
            log_dir.mkdir(parents=True, exist_ok=True)
        ok = False
        try:
            self._create(node, self.opt.accelerator_type, dry)
            for cmd in self.copy_cmds(node, tarball):
                self._run(cmd, dry)
            if len(nodes) == 2:
                self._create(nodes[1], self.opt.eval_accelerator_type, dry)
                for cmd in self.copy_cmds(nodes[1], tarball):
                    self._run(cmd, dry)
            ok = self._train_and_eval(sub, run, node, log_dir, dry)
        except LaunchError as e:
            self.say(f"FAILED {run.name}: {e}")
        if ok or not self.opt.keep_on_failure:
            for n in nodes:
                self._run(self.delete_cmd(n), dry, check=False)
        elif not dry:
            self.say(f"# keeping {', '.join(nodes)} for inspection (--tpu_keep_on_failure)")
        return ok

    def _train_and_eval(self, sub: Submission, run, node: str, log_dir, dry: bool) -> bool:
        train = self.train_cmd(sub, run, node)
        watch = sub.eval_mode == "watch"
        evaluate = self.eval_cmd(sub, run, node, watch=watch) if sub.eval_mode != "none" else None
        if dry:
            self._run(train, dry)
            if evaluate:
                self._run(evaluate, dry)
            return True
        with open(log_dir / "train.log", "a") as tlog, open(log_dir / "eval.log", "a") as elog:
            self.say("+ " + shell_join(train))
            trainer = subprocess.Popen(train, stdout=tlog, stderr=subprocess.STDOUT)
            evaluator = None
            if evaluate and watch:
                self.say("+ " + shell_join(evaluate))
                evaluator = subprocess.Popen(evaluate, stdout=elog, stderr=subprocess.STDOUT)
            if trainer.wait() != 0:
                if evaluator is not None:
                    evaluator.terminate()
                    evaluator.wait()
                raise LaunchError(f"trainer exited with {trainer.returncode}; see {tlog.name}")
            if evaluate and not watch:
                self.say("+ " + shell_join(evaluate))
                evaluator = subprocess.Popen(evaluate, stdout=elog, stderr=subprocess.STDOUT)
            if evaluator is not None and evaluator.wait() != 0:
                raise LaunchError(f"evaluator exited with {evaluator.returncode}; see {elog.name}")
        self.say(f"done {run.name}")
        return True

    def submit(self, sub: Submission, runs: list) -> int:
        """Runs every unfinished run; 0 when all succeed, else 1."""
        todo = []
        for run in runs:
            if not sub.dry_run and self.is_done(run):
                self.say(f"# skip {run.name} (done)")
            else:
                todo.append(run)
        if not todo:
            return 0
        tarball = self.opt.tarball or str(
            pathlib.Path(tempfile.gettempdir()) / "repeat_scaling_code.tar.gz"
        )
        if sub.dry_run:
            self.say(f"# pack the repository (git ls-files) into {tarball}")
        else:
            pack_repository(tarball)
        if self.parallel == 1 or sub.dry_run:
            results = [self.run_one(sub, run, tarball) for run in todo]
        else:
            with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
                results = list(pool.map(lambda r: self.run_one(sub, r, tarball), todo))
        return 0 if all(results) else 1


def wait_for_config(workdir: str) -> str:
    """A shell loop that waits until the trainer has written `workdir/config.json`."""
    path = shlex.quote(f"{workdir}/config.json")
    if workdir.startswith("gs://"):
        return f"until gcloud storage ls {path} >/dev/null 2>&1; do sleep 30; done"
    return f"until [ -f {path} ]; do sleep 30; done"


def pack_repository(path: str, root: pathlib.Path = REPO_ROOT) -> None:
    """Writes a tar.gz of the repository's files (tracked plus untracked, not ignored).

    Token stores (`data/stores/`), launcher logs and `demo_out/` are left out.
    """
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
    )
    if proc.returncode != 0:
        raise LaunchError(f"cannot list the repository files in {root} (git ls-files failed)")
    names = [
        n
        for n in proc.stdout.decode().split("\0")
        if n and not n.startswith(PACK_EXCLUDE) and (root / n).is_file()
    ]
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            try:
                tar.add(root / name, arcname=name)
            except FileNotFoundError:  # removed while packing (an editor's temp file)
                continue
