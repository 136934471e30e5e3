"""`tpu` backend: Cloud TPU VMs and pods through the gcloud CLI.

Per run (TPU node `<prefix>-<run name>` with `_` -> `-`), in order:

1. create the node: `gcloud compute tpus tpu-vm create` (on-demand, `--spot` or
   `--preemptible`), or with `queued=True` a queued resource
   (`gcloud compute tpus queued-resources create ... --node-id=NODE`) polled with
   `describe` until ACTIVE. A node that already exists (`tpu-vm describe` succeeds) is
   reused, so re-submitting after a failure resumes on it.
2. copy the code: `tpu-vm scp` of a tarball of the repository to every worker, then
   `tpu-vm ssh --worker=all` to unpack it and run the setup: by default `uv` (installed
   when missing) makes `~/repeat_scaling/.venv` with Python 3.11 (the TPU runtime images
   ship 3.10; the package needs >= 3.11) and installs the package with `jax[tpu]` into
   it. The runs' interpreter (`.venv/bin/python` by default) is then checked on every
   worker (before the setup when it is a system interpreter): an older Python is one line
   naming the runtime and its version. Each run's token store (`data.store`, relative to
   the code directory) must exist on every worker: checked before the trainer starts.
3. train: `tpu-vm ssh --worker=all --command='cd ~/repeat_scaling && .venv/bin/python -m
   repeat_scaling.train ...'` on every worker at once (jax.distributed detects the pod
   itself); the workdir is `ROOT/NAME`. ROOT is normally a gs://BUCKET/PATH URL, passed
   straight to the trainer and evaluator, which read and write it through gcsfs and
   orbax/tensorstore (`repeat_scaling/workdir_io.py`; the VMs' service account needs
   read/write access to the bucket; no gcsfuse). An absolute path that every worker
   shares (e.g. a gcsfuse or NFS mount set up in `setup`) works too.
4. evaluate, beside the trainer (`eval_mode=watch`) or after it (`after`): on worker 0
   on its CPU (`eval_on=worker0`; the trainer holds the TPU chips) or on a separate
   small TPU VM `NODE-eval` (`eval_on=vm`), created, set up and deleted like the
   node, in its own zone and runtime (`eval_zone`, `eval_runtime_version`; defaults:
   the run's zone and the eval type's default runtime).
5. delete the node(s) (`--quiet`; for queued resources `queued-resources delete
   --force`), also after a failure unless `keep_on_failure`.

Before any VM is created, with `compile_check` (`--tpu_compile_check`, on by default in
`launch/submit.py`), every run is compiled for the accelerator type on this machine
(`repeat_scaling.compile`, needs libtpu: the `dev` extra) and the sweep is refused,
naming the run and its numbers, when one does not fit in HBM (train step; with
`eval_on=vm` also the evaluator's programs on the eval type).

Capacity: on-demand, `--spot` or `--preemptible` for `tpu-vm create`; queued resources
take `--spot`, and `preemptible` becomes `gcloud alpha ... queued-resources create
--best-effort` (the GA command has no preemptible tier).

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
import posixpath
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
from repeat_scaling import run_files, sweeps

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOTE_DIR = "~/repeat_scaling"
REMOTE_TARBALL = "/tmp/repeat_scaling.tar.gz"
# Never shipped with the code: token stores and launcher logs (prepared/written per host).
PACK_EXCLUDE = ("data/stores/", "launch_logs/", "demo_out/")
#: The interpreter of the runs on the workers (relative to REMOTE_DIR, where every command
#: starts): the virtual environment DEFAULT_SETUP makes.
DEFAULT_PYTHON = ".venv/bin/python"
MIN_PYTHON = (3, 11)
#: uv (installed when missing) brings Python 3.11 into .venv: the TPU runtime images
#: (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, ...) are Ubuntu 22.04 with Python 3.10.
DEFAULT_SETUP = (
    'export PATH="$HOME/.local/bin:$PATH" && '
    "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
    "uv venv -q --allow-existing --python 3.11 .venv && "
    "uv pip install -q --python .venv/bin/python -U 'jax[tpu]' -e ."
)
#: Runtime image per TPU generation (accelerator-type prefix), used when none is given.
DEFAULT_RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def default_runtime(accelerator_type: str) -> str:
    """The runtime image for an accelerator type ('' when its generation is unknown)."""
    return DEFAULT_RUNTIMES.get(accelerator_type.split("-")[0].lower(), "")


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    """Flags of the tpu backend (see `submit.py --helpfull`)."""

    zone: str
    accelerator_type: str
    runtime_version: str = ""  # '' = default_runtime(accelerator_type)
    project: str = ""
    spot: bool = False
    preemptible: bool = False
    queued: bool = False
    name_prefix: str = "rs"
    eval_on: str = "worker0"  # worker0 | vm
    eval_accelerator_type: str = "v5litepod-1"
    eval_zone: str = ""  # '' = zone
    eval_runtime_version: str = ""  # '' = default_runtime(eval_accelerator_type)
    setup: str = DEFAULT_SETUP
    setup_extra: str = ""  # more commands after the setup (e.g. copying the token store)
    keep_on_failure: bool = False
    poll_s: float = 30.0
    log_dir: str = "launch_logs"
    tarball: str = ""  # where the code tarball is written (default: in the temp dir)
    compile_check: bool = False  # compile every run for the type first (submit.py: on)

    def __post_init__(self):
        if not self.runtime_version and self.accelerator_type:
            object.__setattr__(self, "runtime_version", default_runtime(self.accelerator_type))
        for field in ("zone", "accelerator_type", "runtime_version"):
            if not getattr(self, field):
                raise LaunchError(f"--tpu_{field}='' ; the tpu backend needs a value for it")
        if not self.eval_zone:
            object.__setattr__(self, "eval_zone", self.zone)
        if not self.eval_runtime_version:
            same = default_runtime(self.eval_accelerator_type) == default_runtime(
                self.accelerator_type
            )
            rt = self.runtime_version if same else default_runtime(self.eval_accelerator_type)
            object.__setattr__(self, "eval_runtime_version", rt or self.runtime_version)
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
        self._eval_nodes: set[str] = set()  # evaluator VMs: their own zone and runtime

    # -- command builders -------------------------------------------------------------
    def _common(self, node: str = "") -> list[str]:
        zone = self.opt.eval_zone if node in self._eval_nodes else self.opt.zone
        flags = [f"--zone={zone}"]
        return flags + ([f"--project={self.opt.project}"] if self.opt.project else [])

    def _runtime(self, node: str) -> str:
        return (
            self.opt.eval_runtime_version if node in self._eval_nodes else self.opt.runtime_version
        )

    def describe_cmd(self, node: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", node, *self._common(node),
                "--format=value(state)"]  # fmt: skip

    def create_cmds(self, node: str, accelerator_type: str) -> list[list[str]]:
        """Create commands: one tpu-vm create, or queued-resource create + describe."""
        lifecycle = ["--spot"] if self.opt.spot else []
        common, runtime = self._common(node), self._runtime(node)
        if self.opt.queued:
            # Preemptible queued resources are gcloud alpha's best-effort tier (the GA
            # command offers --spot, --guaranteed and --reserved only).
            gcloud = ["gcloud", "alpha"] if self.opt.preemptible else ["gcloud"]
            if self.opt.preemptible:
                lifecycle = ["--best-effort"]
            return [
                [*gcloud, "compute", "tpus", "queued-resources", "create", f"{node}-qr",
                 f"--node-id={node}", *common, f"--accelerator-type={accelerator_type}",
                 f"--runtime-version={runtime}", *lifecycle],
                ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{node}-qr",
                 *common, "--format=value(state.state)"],
            ]  # fmt: skip
        if self.opt.preemptible:
            lifecycle = ["--preemptible"]
        return [
            ["gcloud", "compute", "tpus", "tpu-vm", "create", node, *common,
             f"--accelerator-type={accelerator_type}", f"--version={runtime}", *lifecycle],
        ]  # fmt: skip

    def ssh_cmd(self, node: str, worker: str, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self._common(node),
                f"--worker={worker}", f"--command={command}"]  # fmt: skip

    def copy_cmds(self, node: str, tarball: str) -> list[list[str]]:
        """scp the code tarball to every worker, unpack it and install it."""
        setup = (
            f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && {self.opt.setup}"
        ) + (f" && {self.opt.setup_extra}" if self.opt.setup_extra else "")
        return [
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:{REMOTE_TARBALL}",
             *self._common(node), "--worker=all"],
            self.ssh_cmd(node, "all", setup),
        ]  # fmt: skip

    def python_check_cmd(self, node: str, python: str) -> list[str]:
        """Prints the workers' Python version; exits 3 when it is older than MIN_PYTHON."""
        code = (
            'import sys; print("python", sys.version.split()[0]); '
            f"sys.exit(0 if sys.version_info >= {MIN_PYTHON} else 3)"
        )
        return self.ssh_cmd(node, "all", f"cd {REMOTE_DIR} && {python} -c {shlex.quote(code)}")

    def store_check_cmd(self, node: str, store: str) -> list[str]:
        """Fails on a worker without the prepared token store ``store``."""
        manifest = shlex.quote(posixpath.join(store, "manifest.json"))
        return self.ssh_cmd(node, "all", f"cd {REMOTE_DIR} && test -f {manifest}")

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
                    *self._common(node), "--force", "--quiet"]  # fmt: skip
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", node, *self._common(node),
                "--quiet"]  # fmt: skip

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

    def _probe(self, cmd: list[str], dry_run: bool) -> tuple[int, str]:
        """Runs a check command, capturing its output: (exit code, stdout)."""
        self.say(("" if dry_run else "+ ") + shell_join(cmd))
        if dry_run:
            return 0, ""
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return proc.returncode, proc.stdout

    def check_python(self, node: str, python: str, dry_run: bool) -> None:
        """LaunchError (one line) unless ``python`` is Python >= MIN_PYTHON on every worker."""
        rc, out = self._probe(self.python_check_cmd(node, python), dry_run)
        if rc == 0:
            return
        want = ".".join(map(str, MIN_PYTHON))
        versions = sorted(set(re.findall(r"^python (\S+)", out, re.MULTILINE)))
        found = f"Python {', '.join(versions)}" if versions else f"not runnable (exit {rc})"
        raise LaunchError(
            f"{node}: {python} on the workers is {found} (runtime {self._runtime(node)}); "
            f"repeat_scaling needs Python >= {want}: keep the default --tpu_setup (uv installs "
            f"Python {want} into .venv) or use a runtime whose python3 is >= {want}"
        )

    def check_store(self, run, node: str, dry_run: bool) -> None:
        """LaunchError (one line) unless ``run``'s token store is on every worker."""
        store = str(sweeps.get_dotted(run.config, "data.store", "") or "")
        if not store or store.startswith("gs://"):
            return  # nothing to find (the trainer reports a gs:// store itself)
        rc, _ = self._probe(self.store_check_cmd(node, store), dry_run)
        if rc == 0:
            return
        where = store if store.startswith("/") else f"{REMOTE_DIR}/{store}"
        parent = posixpath.dirname(store.rstrip("/")) or "."
        name = posixpath.basename(store.rstrip("/"))
        raise LaunchError(
            f"run {run.name}: data.store={store!r} is not on every worker of {node} (no "
            f"{where}/manifest.json): prepare it once (python -m repeat_scaling.prepare), "
            f"upload it (gcloud storage cp -r {store} gs://BUCKET/stores/) and copy it down "
            f"with --tpu_setup_extra='mkdir -p {parent} && gcloud storage cp -r "
            f"gs://BUCKET/stores/{name} {parent}/'"
        )

    def compile_check(self, sub: Submission, runs: list) -> None:
        """Compiles every run for the accelerator type here (no VM); LaunchError naming the
        first run that does not fit (train step, or the evaluator's programs on its VM)."""
        from repeat_scaling.compile import CompileCheckError
        from repeat_scaling.compile.check import check_runs
        from repeat_scaling.compile.report import misfit_line, runs_table

        eval_type = None
        if self.opt.eval_on == "vm" and sub.eval_mode != "none":
            eval_type = self.opt.eval_accelerator_type
        try:
            reports = check_runs(
                [(r.name, r.config) for r in runs],
                self.opt.accelerator_type,
                eval_topology=eval_type,
                log=self.say,
            )
        except CompileCheckError as e:
            raise LaunchError(f"compile check: {e} (--notpu_compile_check skips it)") from None
        self.say(runs_table(reports))
        bad = [name for name, r in reports.items() if not r["fits"]]
        if bad:
            more = f" ({len(bad)} of {len(reports)} runs do not fit)" if len(bad) > 1 else ""
            raise LaunchError(misfit_line(bad[0], reports[bad[0]]) + more)

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
        path = f"{run.workdir}/{run_files.RESULTS}"
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
        self._eval_nodes.update(nodes[1:])
        log_dir = pathlib.Path(self.opt.log_dir) / run.name
        if not dry:
            log_dir.mkdir(parents=True, exist_ok=True)
        ok = False
        # A system interpreter is checked before the setup installs into it; the default
        # .venv/bin/python (relative to the code directory) exists only after the setup.
        first = "/" not in sub.python
        try:
            for n, accel in zip(nodes, (self.opt.accelerator_type, self.opt.eval_accelerator_type)):
                self._create(n, accel, dry)
                if first:
                    self.check_python(n, sub.python, dry)
                for cmd in self.copy_cmds(n, tarball):
                    self._run(cmd, dry)
                if not first:
                    self.check_python(n, sub.python, dry)
                self.check_store(run, n, dry)
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
        if self.opt.compile_check:  # before any VM exists
            self.compile_check(sub, todo)
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
