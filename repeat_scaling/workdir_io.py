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


def join(root: str, *parts: str) -> str:
    """``root/part/...`` as a string, for local paths and URLs alike."""
    return "/".join([str(root).rstrip("/"), *parts])


# ----------------------------------------------------------------------------------
# Whole-file reads and writes
# ----------------------------------------------------------------------------------
def write_text_atomic(path: WPath, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half.

    Local: write ``<name>.tmp`` then rename. GCS: one object upload (atomic per object).
    Parent directories are created locally.
    """
    if isinstance(path, pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    else:
        path.write_text(text, encoding="utf-8")


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
# A writer lock on GCS
# ----------------------------------------------------------------------------------
class GcsLockError(RuntimeError):
    """Another live process holds the lock object (or took it over from this one)."""


class GcsLock:
    """Best-effort exclusive lock: an object ``{"owner", "token", "heartbeat"}`` at ``path``.

    Every write and delete of the lock object carries a GCS generation precondition
    (``ifGenerationMatch``), so it only succeeds on the exact object version this process
    last read or wrote:

    * ``acquire`` creates the object with ``ifGenerationMatch=0`` (GCS rejects the upload
      if the object exists, so two processes racing for a free lock cannot both win). A
      lock whose heartbeat is older than ``stale_s`` (its holder was killed without
      releasing it), or whose owner is a dead process on this host, is taken over by
      rewriting it with ``ifGenerationMatch=<the generation read>``: of two processes that
      saw the same stale lock, only the first rewrite succeeds. The lock is then re-read,
      and acquiring fails unless it names this holder.
    * A daemon thread re-reads the lock every ``heartbeat_s`` and rewrites the heartbeat
      with ``ifGenerationMatch=<the generation read>`` only while the lock still names this
      holder (``token``, random per acquisition). A holder that was paused past
      ``stale_s`` and taken over finds another owner (or a failed precondition), stops
      heart-beating and is marked :attr:`lost`; it never overwrites the new owner's lock.
    * ``check`` re-reads the lock and raises :class:`GcsLockError` unless this process
      still holds it (the results writer calls it before every upload).
    * ``release`` deletes the object only if it still names this holder, with
      ``ifGenerationMatch=<the generation read>``.

    Best effort: clock skew between hosts beyond ``stale_s`` can let a live holder be taken
    over (it then finds out at its next ``check`` or heartbeat). Emulators that ignore
    preconditions still get the owner re-reads.
    """

    def __init__(self, path: WPath, *, heartbeat_s: float = 60.0, stale_s: float = 300.0):
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.token = ""
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- object access with generations --------------------------------------------------
    def _fs_key(self) -> tuple[Any, str, str]:
        import fsspec

        bucket, _, key = str(self.path)[len(GCS_PREFIX) :].partition("/")
        return fsspec.filesystem("gs"), bucket, key

    def _read(self) -> tuple[dict[str, Any] | None, int | None]:
        """``(record, generation)`` of the lock object; ``(None, None)`` when absent.

        An unreadable record is ``{}`` (a stale lock). The content is downloaded with
        ``ifGenerationMatch`` of the metadata just read, so both describe one version.
        """
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
        raise GcsLockError(f"lock {self.path} keeps changing; another process is using it")

    def _write(self, if_generation: int) -> int:
        """Upload this holder's record if the object's generation is ``if_generation``
        (0: only if absent); returns the new generation. FileExistsError on a mismatch."""
        fs, bucket, key = self._fs_key()
        record = json.dumps({"owner": self.owner, "token": self.token, "heartbeat": time.time()})
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
        """Delete the object if its generation is ``if_generation`` (else nothing)."""
        fs, bucket, key = self._fs_key()
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(if_generation))
        except (FileNotFoundError, FileExistsError):
            pass  # already gone, or replaced by another holder: not ours to delete

    def _mine(self, record: dict[str, Any] | None) -> bool:
        return bool(self.token) and record is not None and record.get("token") == self.token

    def _holder_alive(self, record: dict[str, Any]) -> bool:
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

    # -- the protocol ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock (or a stale one over); :class:`GcsLockError` if a live holder has it."""
        import uuid

        record, generation = self._read()
        if record is not None and self._holder_alive(record):
            beat = record.get("heartbeat")
            age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "?"
            raise GcsLockError(
                f"lock {self.path} is held by {record.get('owner', '?')} (heartbeat {age})"
            )
        self.token = uuid.uuid4().hex
        try:
            self._write(0 if generation is None else generation)
        except FileExistsError:
            self.token = ""
            raise GcsLockError(f"lock {self.path} was taken by another process") from None
        record, _ = self._read()  # emulators ignore preconditions: the owner decides
        if not self._mine(record):
            self.token = ""
            owner = "?" if record is None else record.get("owner", "?")
            raise GcsLockError(f"lock {self.path} was taken by {owner}")
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="gcs-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # released on normal exit even if never closed

    def check(self) -> None:
        """Raise :class:`GcsLockError` unless the lock object still names this holder."""
        record, _ = self._read()
        if self.lost or not self._mine(record):
            self.lost = True
            owner = "nobody" if record is None else record.get("owner", "?")
            raise GcsLockError(
                f"lock {self.path} is no longer held by {self.owner} ({owner} has it)"
            )

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
            except (OSError, GcsLockError):
                pass  # transient; the next beat retries

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if still ours (idempotent)."""
        if self._thread is None:
            return
        atexit.unregister(self.release)
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        try:
            record, generation = self._read()
        except GcsLockError:
            return
        if self._mine(record):
            self._delete(generation)
        self.token = ""


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
