"""Workdir paths: a local directory or a ``gs://bucket/path`` URL, one small API.

Every file the trainer, evaluator, launcher and status tool keep in a run's workdir
(``config.json``, ``data_plan.json``, ``train/metrics.jsonl``, ``tensorboard/``,
``eval/results.jsonl`` and its lock, orbax checkpoints) goes through this module, so a
workdir may live on the local file system or directly in Google Cloud Storage.

* :func:`workdir_path` turns a string into a path object: a ``pathlib.Path`` (made
  absolute) for local paths, an ``etils.epath.Path`` for ``gs://`` URLs. Both have the
  pathlib API (``/``, ``read_text``, ``write_text``, ``exists``, ``is_dir``, ``iterdir``,
  ``mkdir``, ``name``), and orbax takes either as a checkpoint directory.
* gs:// goes through fsspec + gcsfs (``pip install gcsfs``), never TensorFlow: this
  module sets ``EPATH_USE_TF=false`` (etils would otherwise pick ``tf.io.gfile`` whenever
  TensorFlow is installed) and turns off gcsfs's directory-listing cache, so a process
  polling a workdir (the evaluator, ``launch/status.py``) sees objects that other
  processes wrote. Credentials: the usual Google application-default credentials (a TPU
  VM's service account, ``gcloud auth application-default login``); tensorstore (orbax's
  array storage) uses the same.
* Atomic writes (:func:`write_text_atomic`): locally a temporary file renamed over the
  target; on GCS a single object upload, which is atomic per object.
* JSONL appends (:class:`JsonlAppender`): object stores cannot append, so on GCS the
  appender keeps the file's lines in memory and re-uploads the whole object on
  ``flush()`` (at most every ``flush_seconds``, and on ``close()``). A killed process
  loses at most the lines since the last flush; they are re-logged after resume.
  Locally each line is appended and flushed at once, as before.
* Token stores are memory-mapped and must be local: :func:`require_local` gives the
  one-line error for a URL.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import socket
import threading
import time
from typing import Any, Union

GCS_PREFIX = "gs://"

#: A workdir path: ``pathlib.Path`` for local paths, ``etils.epath.Path`` for gs:// URLs.
WPath = Union[pathlib.Path, Any]  # noqa: UP007  (epath.Path is imported lazily)


class WorkdirError(ValueError):
    """A workdir (or other path) that cannot be used; one-line message."""


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` strings (and gs:// epath objects)."""
    return "://" in str(path)


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GCS_PREFIX)


_configured = False


def configure_gcs() -> None:
    """Route gs:// through fsspec/gcsfs without TensorFlow and without stale listings.

    Idempotent; call before the first gs:// access of the process (``workdir_path`` does).
    """
    global _configured
    if _configured:
        return
    os.environ.setdefault("EPATH_USE_TF", "false")
    try:
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()  # re-read EPATH_USE_TF
    except (ImportError, AttributeError):
        pass
    try:
        import fsspec.config
    except ImportError as e:
        raise WorkdirError(
            "gs:// workdirs need fsspec and gcsfs; install them with `pip install gcsfs`"
        ) from e
    gs = fsspec.config.conf.setdefault("gs", {})
    gs.setdefault("use_listings_cache", False)
    _configured = True


def workdir_path(path: str | os.PathLike, *, what: str = "--workdir") -> WPath:
    """``path`` as a path object: absolute ``pathlib.Path`` or ``epath.Path`` for gs://.

    Other URL schemes are refused with a one-line :class:`WorkdirError` naming ``what``.
    """
    if not isinstance(path, (str, os.PathLike)):
        return path  # already an epath.Path
    text = os.fspath(path)
    if is_gcs(text):
        if len(text.rstrip("/")) <= len(GCS_PREFIX):
            raise WorkdirError(f"{what}={text!r}: expected gs://BUCKET/PATH")
        configure_gcs()
        from etils import epath

        return epath.Path(text.rstrip("/"))
    if is_url(text):
        raise WorkdirError(
            f"{what}={text!r}: unsupported URL scheme; expected a local path or gs://BUCKET/PATH"
        )
    return pathlib.Path(text).absolute()


def check_workdir(path: str | os.PathLike, *, what: str = "--workdir") -> WPath:
    r""":func:`workdir_path` plus, for gs://, one listing of the bucket to fail early.

    A missing bucket, missing credentials or an unreachable GCS become one-line
    :class:`WorkdirError`\ s here instead of a traceback deep inside a run.
    """
    p = workdir_path(path, what=what)
    if isinstance(p, pathlib.Path):
        return p
    bucket = str(p)[len(GCS_PREFIX) :].split("/")[0]
    import fsspec

    try:
        fsspec.filesystem("gs").ls(bucket)
    except FileNotFoundError:
        raise WorkdirError(f"{what}={str(path)!r}: bucket gs://{bucket} does not exist") from None
    except Exception as e:  # auth, network: gcsfs/aiohttp/google-auth error classes vary
        first = (str(e).splitlines() or [""])[0][:200]
        raise WorkdirError(
            f"{what}={str(path)!r}: cannot list gs://{bucket} ({type(e).__name__}: {first}); "
            "check network access and credentials (gcloud auth application-default login)"
        ) from None
    return p


def require_local(path: str | os.PathLike, what: str) -> pathlib.Path:
    """``path`` as a local ``pathlib.Path``; a URL is a one-line :class:`WorkdirError`."""
    if is_url(path):
        raise WorkdirError(
            f"{what}={str(path)!r} is a URL; expected a local directory "
            "(token stores are memory-mapped: copy the store to local disk first)"
        )
    return pathlib.Path(path)


def user_cache_dir() -> pathlib.Path:
    """This user's cache of the suite: ``$XDG_CACHE_HOME/repeat_scaling`` (default
    ``~/.cache/repeat_scaling``): compiled programs, verified shards, compile checks."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "repeat_scaling"


def absolute_local(path: str | os.PathLike, what: str) -> str:
    """A local path as an absolute path: ``~`` expanded, a relative path taken from the
    current working directory (the one rule for paths in configs; WorkdirError for a URL).
    """
    return os.path.abspath(os.path.expanduser(str(require_local(path, what))))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` as a string, for local paths and URLs alike."""
    return "/".join([str(root).rstrip("/"), *parts])


# ----------------------------------------------------------------------------------
# Whole-file reads and writes
# ----------------------------------------------------------------------------------
def write_bytes_atomic(path: WPath, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    Local: write ``<name>.tmp`` then rename. GCS: one object upload (atomic per object).
    Parent directories are created locally.
    """
    if isinstance(path, pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def write_text_atomic(path: WPath, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: WPath, obj: Any, *, default: Any = None) -> None:
    """``obj`` as indented, key-sorted JSON (plus newline), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def read_text(path: WPath, default: str | None = None) -> str | None:
    """The file's text, or ``default`` when it does not exist."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return default


def upload_file(local: str | os.PathLike, remote: WPath) -> None:
    """Copy a local file to ``remote`` (a gs:// epath) as one object upload."""
    import fsspec

    fsspec.filesystem("gs").put_file(os.fspath(local), str(remote)[len(GCS_PREFIX) :])


def mkdirs(path: WPath) -> None:
    """``mkdir -p`` locally; nothing on GCS (objects need no directories)."""
    if isinstance(path, pathlib.Path):
        path.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------
# JSONL appends
# ----------------------------------------------------------------------------------
class JsonlAppender:
    """Appends lines to a text file; on GCS by re-uploading the whole object on flush.

    Args:
      path: the file (local or gs://).
      flush_seconds: on GCS, ``write_line`` uploads when this long has passed since the
        last upload (0 = upload on every line). Locally every line is flushed at once.
    """

    def __init__(self, path: WPath, *, flush_seconds: float = 30.0):
        self.path = path
        self.local = isinstance(path, pathlib.Path)
        self.flush_seconds = float(flush_seconds)
        self._file = None
        self._lines: list[str] = []
        self._dirty = False
        self._last_flush = time.monotonic()
        if self.local:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        else:
            text = read_text(path, "")
            self._lines = [s + "\n" for s in text.splitlines() if s.strip()]

    def write_line(self, line: str) -> None:
        """Append one line (a newline is added)."""
        line = line.rstrip("\n") + "\n"
        if self._file is not None:
            self._file.write(line)
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.path.write_text("".join(self._lines), encoding="utf-8")
            self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()


def append_line(path: WPath, line: str) -> None:
    """Append one line now (on GCS: read, extend, re-upload the object)."""
    appender = JsonlAppender(path, flush_seconds=0.0)
    appender.write_line(line)
    appender.close()


# ----------------------------------------------------------------------------------
# One writer per workdir: a lock object with compare-and-swap writes (local and GCS)
# ----------------------------------------------------------------------------------
class LockError(WorkdirError):
    """Another live process holds the lock (or took it over from this one); one line."""


#: Alias of :class:`LockError` (raised by both lock backends).
GcsLockError = LockError


def _slurm_job() -> tuple[str, int] | None:
    """``(SLURM_JOB_ID, SLURM_RESTART_COUNT)`` inside a SLURM job, else None. A requeued
    job keeps its id and counts up its restarts; SLURM stops every task of a job before it
    requeues it, so a lock of the same job with fewer restarts has no live holder."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return job, int(restart) if restart.isdigit() else 0


class WorkdirLock:
    """Best-effort exclusive lock: a record ``{"owner", "host", "pid", "token", "heartbeat"}``
    at ``path``, local or gs://. The trainer holds ``WORKDIR/train.lock``, the evaluator
    ``WORKDIR/eval/results.lock``; :func:`workdir_lock` picks the backend.

    Every write and delete of the record is a compare-and-swap on its *generation*
    (GCS: the object generation with an ``ifGenerationMatch`` precondition; local: a
    counter in the record, compared and replaced under an ``flock`` of the lock's
    directory, the file replaced by an atomic rename), so it only succeeds on the exact
    version this process last read or wrote:

    * ``acquire`` creates the record only if absent (generation 0: two processes racing
      for a free lock cannot both win). A record whose heartbeat is older than
      ``stale_s`` (its holder hung or was killed on another host), whose owner is a
      dead process on this host, or that an earlier run of this requeued SLURM job
      wrote (same ``slurm_job``, fewer ``slurm_restart``), is taken over by rewriting it at the generation read:
      of two processes that saw the same stale lock only the first rewrite succeeds.
      :attr:`took_over` then says whose lock it was. The record is re-read, and
      acquiring fails unless it names this holder.
    * A daemon thread re-reads the record every ``heartbeat_s`` and rewrites the
      heartbeat at the generation read only while it still names this holder (``token``,
      random per acquisition). A holder paused past ``stale_s`` and taken over finds
      another owner (or a failed compare), stops heart-beating and is marked
      :attr:`lost`; it never overwrites the new owner's record.
    * ``check`` re-reads the record and raises :class:`LockError` unless this process
      still holds it (the results writer calls it before every upload, the trainer
      before every checkpoint).
    * ``release`` deletes the record only if it still names this holder.

    Best effort: clock skew between hosts beyond ``stale_s`` can let a live holder be
    taken over (it then finds out at its next ``check`` or heartbeat). Emulators that
    ignore GCS preconditions still get the owner re-reads.
    """

    def __init__(self, path: WPath, *, heartbeat_s: float = 60.0, stale_s: float = 300.0):
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}"
        self.token = ""
        self.lost = False
        #: One line naming the stale holder whose lock ``acquire`` took over (else None).
        self.took_over: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- backend: the record with its generation -------------------------------------------
    def _read(self) -> tuple[dict[str, Any] | None, int | None]:
        """``(record, generation)``; ``(None, None)`` when absent; ``{}`` when unreadable."""
        raise NotImplementedError

    def _write(self, if_generation: int) -> int:
        """Write this holder's record if the generation is ``if_generation`` (0: only if
        absent); returns the new generation. FileExistsError on a mismatch."""
        raise NotImplementedError

    def _delete(self, if_generation: int) -> None:
        """Delete the record if its generation is ``if_generation`` (else nothing)."""
        raise NotImplementedError

    def _record(self) -> dict[str, Any]:
        host, _, pid = self.owner.rpartition(":")
        record = {
            "owner": self.owner,
            "host": host,
            "pid": int(pid) if pid.isdigit() else pid,
            "token": self.token,
            "heartbeat": time.time(),
        }
        job = _slurm_job()
        if job is not None:
            record["slurm_job"], record["slurm_restart"] = job
        return record

    # -- the protocol ----------------------------------------------------------------------
    def _mine(self, record: dict[str, Any] | None) -> bool:
        return bool(self.token) and record is not None and record.get("token") == self.token

    def _holder_alive(self, record: dict[str, Any]) -> bool:
        job = _slurm_job()
        if job is not None and record.get("slurm_job") == job[0]:
            restart = record.get("slurm_restart")
            if isinstance(restart, int) and restart < job[1]:
                return False  # an earlier run of this requeued SLURM job (stopped by SLURM)
        owner = str(record.get("owner", ""))
        host, _, pid = owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        beat = record.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat < self.stale_s

    @staticmethod
    def _describe(record: dict[str, Any]) -> str:
        beat = record.get("heartbeat")
        age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "?"
        return f"{record.get('owner', '?')} (heartbeat {age})"

    def acquire(self) -> None:
        """Take the lock (or a stale one over); :class:`LockError` if a live holder has it."""
        import uuid

        record, generation = self._read()
        self.took_over = None
        if record is not None and self._holder_alive(record):
            raise LockError(f"lock {self.path} is held by {self._describe(record)}")
        self.token = uuid.uuid4().hex
        try:
            self._write(0 if generation is None else generation)
        except FileExistsError:
            self.token = ""
            raise LockError(f"lock {self.path} was taken by another process") from None
        mine, _ = self._read()  # emulators ignore preconditions: the owner decides
        if not self._mine(mine):
            self.token = ""
            owner = "?" if mine is None else mine.get("owner", "?")
            raise LockError(f"lock {self.path} was taken by {owner}")
        if record is not None:
            self.took_over = f"took over the stale lock {self.path} of {self._describe(record)}"
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # released on normal exit even if never closed

    def check(self) -> None:
        """Raise :class:`LockError` unless the record still names this holder."""
        record, _ = self._read()
        if self.lost or not self._mine(record):
            self.lost = True
            owner = "nobody" if record is None else record.get("owner", "?")
            raise LockError(f"lock {self.path} is no longer held by {self.owner} ({owner} has it)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                record, generation = self._read()
                if not self._mine(record):
                    self.lost = True
                    return
                self._write(generation)
            except FileExistsError:  # changed since the read: another holder took it over
                self.lost = True
                return
            except (OSError, LockError):
                pass  # transient; the next beat retries

    def release(self) -> None:
        """Stop the heartbeat and delete the record if still ours (idempotent)."""
        if self._thread is None:
            return
        atexit.unregister(self.release)
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        try:
            record, generation = self._read()
        except (LockError, OSError):
            return
        if self._mine(record):
            self._delete(generation)
        self.token = ""


class LocalLock(WorkdirLock):
    """:class:`WorkdirLock` on a local file system: the generation is a counter in the
    record, compared and replaced under an exclusive ``flock`` of the lock's directory
    (held only for the read-compare-rename)."""

    def _mutex(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the flock

        return held()

    def _read_unlocked(self) -> tuple[dict[str, Any] | None, int | None]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        if not isinstance(record, dict):
            record = {}
        generation = record.get("generation")
        return record, generation if isinstance(generation, int) and generation > 0 else 1

    def _read(self) -> tuple[dict[str, Any] | None, int | None]:
        with self._mutex():
            return self._read_unlocked()

    def _write(self, if_generation: int) -> int:
        with self._mutex():
            _, generation = self._read_unlocked()
            if (generation or 0) != int(if_generation):
                raise FileExistsError(str(self.path))
            new = int(if_generation) + 1
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self._record(), "generation": new}), encoding="utf-8")
            os.replace(tmp, self.path)
            return new

    def _delete(self, if_generation: int) -> None:
        with self._mutex():
            _, generation = self._read_unlocked()
            if generation == int(if_generation):
                self.path.unlink(missing_ok=True)


class GcsLock(WorkdirLock):
    """:class:`WorkdirLock` on GCS: the object generation, with ``ifGenerationMatch``
    preconditions on every upload and delete."""

    def _fs_key(self) -> tuple[Any, str, str]:
        import fsspec

        bucket, _, key = str(self.path)[len(GCS_PREFIX) :].partition("/")
        return fsspec.filesystem("gs"), bucket, key

    def _read(self) -> tuple[dict[str, Any] | None, int | None]:
        """The content is downloaded with ``ifGenerationMatch`` of the metadata just
        read, so both describe one version."""
        fs, bucket, key = self._fs_key()
        for _ in range(5):
            try:
                meta = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                generation = int(meta["generation"])
                _, content = fs.call(
                    "GET", "b/{}/o/{}", bucket, key, alt="media", ifGenerationMatch=generation
                )
            except FileNotFoundError:
                return None, None
            except FileExistsError:  # 412: replaced between the two reads; read again
                continue
            try:
                record = json.loads(content)
            except ValueError:
                record = {}
            return (record if isinstance(record, dict) else {}), generation
        raise LockError(f"lock {self.path} keeps changing; another process is using it")

    def _write(self, if_generation: int) -> int:
        fs, bucket, key = self._fs_key()
        record = json.dumps(self._record())
        body = (
            "--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
            + json.dumps({"name": key})
            + "\n--==0==\nContent-Type: application/json\n\n"
            + record
            + "\n--==0==--"
        ).encode()
        out = fs.call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="multipart",
            headers={"Content-Type": 'multipart/related; boundary="==0=="'},
            data=body,
            json_out=True,
            ifGenerationMatch=str(int(if_generation)),
        )
        return int(out["generation"])

    def _delete(self, if_generation: int) -> None:
        fs, bucket, key = self._fs_key()
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(if_generation))
        except (FileNotFoundError, FileExistsError):
            pass  # already gone, or replaced by another holder: not ours to delete


def workdir_lock(path: WPath, **kwargs: float) -> WorkdirLock:
    """The :class:`WorkdirLock` for ``path``: :class:`LocalLock` or :class:`GcsLock`."""
    return (LocalLock if isinstance(path, pathlib.Path) else GcsLock)(path, **kwargs)


# ----------------------------------------------------------------------------------
# String-path helpers (for code that keeps paths as strings, e.g. the report)
# ----------------------------------------------------------------------------------
def exists(path: str) -> bool:
    """``os.path.exists`` for local paths and gs:// URLs."""
    return workdir_path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """``os.path.isdir`` for local paths and gs:// URLs (a gs:// prefix with objects)."""
    return workdir_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def open_text(path: str):
    """A text reader (context manager) for a local file or a gs:// object (read whole)."""
    if is_url(path):
        import io

        return io.StringIO(workdir_path(path).read_bytes().decode("utf-8", errors="replace"))
    return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115


def glob_dirs(pattern: str) -> list[str]:
    """Directories matching a glob ``pattern`` (local, or gs://BUCKET/... with fsspec)."""
    if is_url(pattern):
        workdir_path(pattern, what="--runs")  # gs:// only; configures gcsfs
        import fsspec

        fs = fsspec.filesystem("gs")
        matches = fs.glob(pattern[len(GCS_PREFIX) :])
        return sorted(GCS_PREFIX + m for m in matches if fs.isdir(m))
    import glob

    return sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
