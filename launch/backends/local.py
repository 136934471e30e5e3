"""`local` backend: trainers and evaluators as subprocesses, N runs at a time.

For each run, in its workdir `ROOT/NAME`:
- `logs/train.log`, `logs/eval.log`: the children's stdout and stderr (appended, one
  header line per attempt);
- `launch.json`: the launcher's record (state, pids, command lines, return codes),
  which `launch/status.py` reads.

Re-submitting is safe: a run whose final step is evaluated (or trained, with
`--eval_mode=none`) is skipped; a trained but unevaluated run gets only its evaluator;
anything else restarts its trainer on the same workdir, which resumes from the latest
committed checkpoint. With `--eval_mode=watch` the evaluator starts as soon as the
trainer has written `config.json` (the evaluator needs it) and follows the run.

Runs that share a token store which does not exist yet start one at a time until the
first has prepared it (its trainer prepares `data.store` from `data.source`), so two
trainers never prepare the same store at once.

Ctrl-C (SIGINT) or SIGTERM stops the launcher cleanly: every child gets SIGTERM (the
trainer saves a checkpoint on SIGTERM), the launcher waits up to `grace_s` for them,
kills what is left, marks those runs `stopped` and exits with 130. Children run in
their own process groups so a terminal's Ctrl-C reaches only the launcher.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any, TextIO

from launch import status as status_lib
from launch.backends import Submission, eval_argv, shell_join, train_argv
from repeat_scaling import run_files


def run_is_done(st: status_lib.RunStatus, eval_mode: str) -> bool:
    """Whether a run needs nothing more under this evaluation mode."""
    return st.evaluated or (eval_mode == "none" and st.trained)


class _Job:
    """One run's trainer and evaluator subprocesses and its launch.json record."""

    def __init__(self, backend: LocalBackend, sub: Submission, run, need_train: bool):
        self.backend, self.sub, self.run = backend, sub, run
        self.need_train = need_train
        self.workdir = pathlib.Path(run.workdir)
        self.train_proc: subprocess.Popen | None = None
        self.eval_proc: subprocess.Popen | None = None
        self.record: dict[str, Any] = {
            "name": run.name,
            "backend": "local",
            "eval_mode": sub.eval_mode,
            "total_steps": run.total_steps,
            "train_command": shell_join(train_argv(sub, run)),
            "eval_command": shell_join(eval_argv(sub, run, watch=sub.eval_mode == "watch")),
        }
        self.state = "pending"
        store = run.config.get("data", {}).get("store", "") if "data" in run.config else ""
        self.store = pathlib.Path(backend.cwd, store).resolve() if store else None

    def store_pending(self) -> bool:
        """Whether this run's token store still has to be prepared (no manifest yet)."""
        return self.store is not None and not (self.store / "manifest.json").is_file()

    # -- bookkeeping ------------------------------------------------------------------
    def _write(self, **updates: Any) -> None:
        self.record.update(updates)
        self.record["updated"] = time.time()
        path = self.workdir / run_files.LAUNCH
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log_path = self.workdir / "logs" / log_name
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shell_join(argv)}\n")
            log.flush()
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.backend.cwd,
                env=self.backend.env,
                start_new_session=True,
            )

    def _start_eval(self, watch: bool) -> None:
        self.eval_proc = self._spawn(eval_argv(self.sub, self.run, watch=watch), "eval.log")
        self._write(eval_pid=self.eval_proc.pid)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._write(state="running", started=time.time(), train_pid=None, eval_pid=None)
        self.state = "running"
        if self.need_train:
            self.backend.say(f"start {self.run.name}")
            self.train_proc = self._spawn(train_argv(self.sub, self.run), "train.log")
            self._write(train_pid=self.train_proc.pid)
        else:
            self.backend.say(f"evaluate {self.run.name} (already trained)")
            self._start_eval(watch=False)

    def poll(self) -> bool:
        """Advances the job; True when it has finished (done or failed)."""
        if self.train_proc is not None and self.record.get("train_returncode") is None:
            rc = self.train_proc.poll()
            if rc is None:
                # The watching evaluator starts once the trainer has written config.json.
                if (
                    self.sub.eval_mode == "watch"
                    and self.eval_proc is None
                    and (self.workdir / run_files.CONFIG).is_file()
                ):
                    self._start_eval(watch=True)
                return False
            self._write(train_returncode=rc)
            if rc != 0:
                self._terminate(self.eval_proc, grace_s=30.0)
                return self._finish("failed", f"trainer exited with {rc}", "train.log")
            if self.sub.eval_mode == "none":
                return self._finish("done")
            if self.eval_proc is None:  # `after`, or a trainer quicker than the watcher
                self._start_eval(watch=False)
        if self.eval_proc is not None:
            rc = self.eval_proc.poll()
            if rc is None:
                return False
            self._write(eval_returncode=rc)
            if rc != 0:
                return self._finish("failed", f"evaluator exited with {rc}", "eval.log")
        return self._finish("done")

    def _finish(self, state: str, why: str = "", log_name: str = "") -> bool:
        self.state = state
        self._write(state=state, ended=time.time())
        if state == "done":
            self.backend.say(f"done {self.run.name}")
        else:
            log = self.workdir / "logs" / log_name
            self.backend.say(f"FAILED {self.run.name}: {why}; see {log}")
            for line in _tail(log, 5):
                self.backend.say(f"  | {line}")
        return True

    def stop(self, grace_s: float) -> None:
        """SIGTERM both children, wait up to grace_s, then SIGKILL; mark `stopped`."""
        procs = [p for p in (self.train_proc, self.eval_proc) if p is not None]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            self._terminate(proc, grace_s=max(deadline - time.monotonic(), 0.0))
        self.state = "stopped"
        self._write(state="stopped", ended=time.time())
        self.backend.say(f"stopped {self.run.name}")

    @staticmethod
    def _terminate(proc: subprocess.Popen | None, grace_s: float) -> None:
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: pathlib.Path, n: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if line.strip()][-n:]


class LocalBackend:
    """Runs trainers and evaluators on this machine, `parallel` runs at a time.

    Args:
      parallel: how many runs (trainer + its evaluator) run at once.
      grace_s: seconds children get to exit after SIGTERM before SIGKILL.
      poll_s: seconds between checks of the children.
      env: the children's environment (default: this process's, unbuffered).
      cwd: the children's working directory (default: this process's, so relative paths
        in configs mean the same for the trainer as for the person who submitted).
      out: where progress lines go.
    """

    def __init__(
        self,
        parallel: int = 1,
        grace_s: float = 300.0,
        poll_s: float = 0.5,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        out: TextIO | None = None,
    ):
        if parallel < 1:
            raise ValueError(f"--parallel={parallel}; expected an int >= 1")
        self.parallel, self.grace_s, self.poll_s = parallel, grace_s, poll_s
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = str(os.getcwd() if cwd is None else cwd)
        self.out = out or sys.stdout
        self._stop_signal: int | None = None

    def say(self, line: str) -> None:
        print(f"[local] {line}", file=self.out, flush=True)

    def submit(self, sub: Submission, runs: list) -> int:
        """Runs every unfinished run to completion. Returns 0, 1 (a run failed) or 130."""
        jobs = []
        for run in runs:
            if run.workdir.startswith("gs://"):
                raise ValueError(f"--root={run.workdir!r}: the local backend needs a local path")
            st = status_lib.run_status(run.workdir, run.total_steps)
            if run_is_done(st, sub.eval_mode):
                self.say(f"skip {run.name} (done)")
                continue
            jobs.append(_Job(self, sub, run, need_train=not st.trained))
        if sub.dry_run:
            for job in jobs:
                if job.need_train:
                    print(job.record["train_command"], file=self.out)
                if sub.eval_mode != "none" or not job.need_train:
                    print(job.record["eval_command"], file=self.out)
            return 0
        if not jobs:
            self.say("nothing to do")
            return 0

        previous = self._install_handlers()
        queue, active, finished = collections.deque(jobs), [], []
        try:
            while (queue or active) and self._stop_signal is None:
                while queue and len(active) < self.parallel:
                    # Runs sharing a store that is not prepared yet start one at a time:
                    # the first prepares it, the others wait for its manifest.
                    job = next((j for j in queue if not self._store_busy(j, active)), None)
                    if job is None:
                        break
                    queue.remove(job)
                    job.start()
                    active.append(job)
                for job in list(active):
                    if job.poll():
                        active.remove(job)
                        finished.append(job)
                if (active or queue) and self._stop_signal is None:
                    time.sleep(self.poll_s)
        finally:
            if self._stop_signal is not None or active:
                self.say(f"stopping {len(active)} run(s): SIGTERM, up to {self.grace_s:.0f}s")
                for job in active:
                    job.stop(self.grace_s)
            self._restore_handlers(previous)
        if self._stop_signal is not None:
            return 130
        failed = [j.run.name for j in finished if j.state == "failed"]
        self.say(f"{len(finished) - len(failed)} run(s) done, {len(failed)} failed")
        return 1 if failed else 0

    @staticmethod
    def _store_busy(job: _Job, active: list[_Job]) -> bool:
        return job.store_pending() and any(a.store == job.store for a in active)

    # -- signals ----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        del frame
        self._stop_signal = signum

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
