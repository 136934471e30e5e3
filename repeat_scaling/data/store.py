"""The token store: memory-mapped flat token arrays per split, plus a manifest.

Layout of a store directory::

    DIR/manifest.json                       # written last; its presence marks a complete store
    DIR/<split>/tokens-00000-of-00003.bin   # raw little-endian uint16 (or uint32) token ids
    DIR/<split>/doc_offsets.npy             # int64 [num_documents + 1] document boundaries

Documents are concatenated, each followed by EOS (id 1); ``document_offsets[i]`` is the
global token position where document ``i`` starts. Every shard but the last holds exactly
``shard_tokens`` tokens, so ``tokens(start, length)`` finds its shard by division: it costs
O(length) whatever the store size, and never reads more than it returns.

The manifest (``manifest.json``) records the format version, the source (spec, description,
fingerprint, counters), the vocabulary (:class:`VocabInfo`, with the model's sha256), the
preparation options, and per split ``documents``, ``tokens``, ``dtype`` and the shards with
their token counts and sha256.

:class:`StoreWriter` writes into a temporary sibling directory and renames it into place at
the end, so an interrupted preparation never leaves a store that looks complete.

Only numpy is needed here: training and evaluation import this module.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import uuid
from typing import Any

import numpy as np

from repeat_scaling import workdir_io
from repeat_scaling.data.vocab import VocabInfo, load_vocab_info

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB per uint16 shard.


class StoreError(ValueError):
    """A token store that is missing, incomplete, corrupt or of the wrong vocabulary."""


def _shard_name(i: int, n: int) -> str:
    return f"tokens-{i:05d}-of-{n:05d}.bin"


class StoreSplit:
    """One split of a store: random access to its tokens.

    Attributes:
      name: split name.
      num_tokens: total tokens (documents + their EOS).
      num_documents: number of documents.
      dtype: numpy dtype of the stored ids (uint16 or uint32).
      document_offsets: int64 [num_documents] start position of every document.
    """

    def __init__(self, root: str, name: str, meta: dict[str, Any]):
        self.name = name
        self.path = os.path.join(root, name)
        self.num_tokens = int(meta["tokens"])
        self.num_documents = int(meta["documents"])
        self.dtype = np.dtype(meta["dtype"])
        self.shard_tokens = int(meta["shard_tokens"])
        self._shard_meta = meta["shards"]
        self._shards: list[np.ndarray] | None = None
        self._bounds: np.ndarray | None = None

    # Lazily opened so that a store can be described without touching the token files.
    @property
    def shards(self) -> list[np.ndarray]:
        if self._shards is None:
            shards = []
            for sm in self._shard_meta:
                p = os.path.join(self.path, sm["file"])
                expect = int(sm["tokens"]) * self.dtype.itemsize
                try:
                    size = os.path.getsize(p)
                except OSError:
                    raise StoreError(f"token shard {p} is missing; re-run prepare") from None
                if size != expect:
                    raise StoreError(
                        f"token shard {p} has {size} bytes, expected {expect}; re-run prepare"
                    )
                if size == 0:
                    shards.append(np.zeros(0, self.dtype))
                    continue
                with open(p, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                # A plain ndarray over the mapping: slicing it is much cheaper than np.memmap.
                shards.append(np.frombuffer(mm, dtype=self.dtype))
            self._shards = shards
        return self._shards

    @property
    def document_bounds(self) -> np.ndarray:
        """int64 [num_documents + 1]: document i spans [bounds[i], bounds[i+1])."""
        if self._bounds is None:
            self._bounds = np.load(os.path.join(self.path, "doc_offsets.npy"), mmap_mode="r")
            if self._bounds.shape != (self.num_documents + 1,):
                raise StoreError(f"{self.path}/doc_offsets.npy has the wrong shape; re-run prepare")
        return self._bounds

    @property
    def document_offsets(self) -> np.ndarray:
        return self.document_bounds[:-1]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's flat array.

        Returns a read-only view into the memory map when the range lies in one shard (the
        common case), else a fresh array. Raises ``IndexError`` for an out-of-range request.
        """
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"tokens({start}, {length}) out of range for split {self.name!r} "
                f"with {self.num_tokens} tokens"
            )
        shards = self._shards if self._shards is not None else self.shards
        st = self.shard_tokens
        i, off = divmod(start, st)
        if off + length <= st:
            return shards[i][off : off + length]
        parts = []
        while length > 0:
            take = min(length, st - off)
            parts.append(shards[i][off : off + take])
            length -= take
            i, off = i + 1, 0
        return np.concatenate(parts)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, its trailing EOS included."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents})")
        b = self.document_bounds
        return self.tokens(int(b[i]), int(b[i + 1] - b[i]))

    def verify(self, cached: bool = False) -> None:
        """Check every shard's size and sha256 against the manifest.

        ``cached``: skip the sha256 of a shard this host already verified with the same
        size and modification time (:func:`verified_cache_path`); sizes are always checked.
        """
        cache = _load_cache() if cached else {}
        changed = False
        for sm in self._shard_meta:
            p = os.path.join(self.path, sm["file"])
            expect = int(sm["tokens"]) * self.dtype.itemsize
            try:
                st = os.stat(p)
            except OSError:
                raise StoreError(f"token shard {p} is missing; re-run prepare") from None
            if st.st_size != expect:
                raise StoreError(
                    f"token shard {p} has {st.st_size} bytes, expected {expect} (corrupt); "
                    "rebuild the store with prepare --overwrite"
                )
            key = os.path.realpath(p)
            stamp = [st.st_size, st.st_mtime_ns, sm["sha256"]]
            if cached and cache.get(key) == stamp:
                continue
            if _sha256_file(p) != sm["sha256"]:
                raise StoreError(
                    f"token shard {p} does not match its sha256 in the manifest (corrupt); "
                    "rebuild the store with prepare --overwrite"
                )
            cache[key] = stamp
            changed = True
        if cached and changed:
            _save_cache(cache)

    def __repr__(self) -> str:
        return (
            f"StoreSplit({self.name!r}, documents={self.num_documents}, tokens={self.num_tokens}, "
            f"dtype={self.dtype.name})"
        )


class TokenStore:
    """A prepared token store directory (see the module docstring).

    Args:
      path: the store directory (``--out`` of prepare).
      expect_vocab: if given (a :class:`VocabInfo` or a vocab spec), raise
        :class:`StoreError` unless the store was prepared with that vocabulary.
    """

    def __init__(self, path: str | os.PathLike, expect_vocab: VocabInfo | str | None = None):
        self.path = os.fspath(path)
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(mpath):
            what = "does not exist" if not os.path.exists(self.path) else "has no manifest.json"
            raise StoreError(f"token store {self.path!r} {what}; run repeat_scaling.prepare first")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:
            raise StoreError(f"{mpath} is unreadable ({e})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"token store {self.path!r} has format_version "
                f"{self.manifest.get('format_version')!r}, expected {FORMAT_VERSION}; re-run prepare"
            )
        self.vocab = VocabInfo.from_dict(self.manifest["vocab"])
        self._splits: dict[str, StoreSplit] = {}
        if expect_vocab is not None:
            self.check_vocab(expect_vocab)

    @property
    def split_names(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def split(self, name: str) -> StoreSplit:
        if name not in self.manifest["splits"]:
            raise StoreError(
                f"token store {self.path!r} has no split {name!r}; it has {self.split_names}"
            )
        if name not in self._splits:
            self._splits[name] = StoreSplit(self.path, name, self.manifest["splits"][name])
        return self._splits[name]

    def verify(self, cached: bool = True) -> None:
        """Check every split's shards against the manifest (:meth:`StoreSplit.verify`):
        sizes always, sha256 once per host and shard modification (``cached``) or always."""
        for name in self.split_names:
            self.split(name).verify(cached=cached)

    def check_vocab(self, expected: VocabInfo | str) -> None:
        """Raise :class:`StoreError` unless the store's vocabulary is ``expected``."""
        expected = load_vocab_info(expected)
        if not self.vocab.same_vocabulary(expected):
            raise StoreError(
                f"token store {self.path!r} was prepared with vocabulary {self.vocab.describe()}, "
                f"but {expected.describe()} was expected; re-run prepare with that vocabulary"
            )

    def __repr__(self) -> str:
        return (
            f"TokenStore({self.path!r}, vocab={self.vocab.describe()}, splits={self.split_names})"
        )


def verified_cache_path() -> str:
    """This host's record of verified shards: ``{realpath: [size, mtime_ns, sha256]}`` in
    ``$XDG_CACHE_HOME/repeat_scaling/verified_shards.json`` (default ``~/.cache``)."""
    return str(workdir_io.user_cache_dir() / "verified_shards.json")


def _load_cache() -> dict[str, Any]:
    try:
        with open(verified_cache_path(), encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(cache: dict[str, Any]) -> None:
    """Best effort (a read-only home only costs the next open a re-hash)."""
    path = verified_cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _SplitWriter:
    """Appends documents (already EOS-terminated token arrays) to one split's shards."""

    def __init__(self, root: str, name: str, dtype: np.dtype, shard_tokens: int):
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.bounds = [0]
        self.shard_sizes: list[int] = []
        self._file = None
        self._hash = None
        self._in_shard = 0
        self._hashes: list[str] = []

    def _open_next(self):
        self._close_shard()
        k = len(self.shard_sizes)
        self._file = open(os.path.join(self.dir, f"shard-{k:05d}.tmp"), "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shard_sizes.append(0)

    def _close_shard(self):
        if self._file is not None:
            self._file.close()
            self._hashes.append(self._hash.hexdigest())
            self._file = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """Append one document's tokens (ending with EOS), or several documents at once.

        Args:
          tokens: the tokens, concatenated when several documents are given.
          lengths: token count of each document in ``tokens`` (None: one document).
        """
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(data) or self._file is None:
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(len(data) - pos, self.shard_tokens - self._in_shard)
            chunk = data[pos : pos + take]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.shard_sizes[-1] += take
            pos += take
        if lengths is None:
            self.bounds.append(self.bounds[-1] + len(data))
        else:
            ends = self.bounds[-1] + np.cumsum(np.asarray(lengths, dtype=np.int64))
            if len(ends) and ends[-1] != self.bounds[-1] + len(data):
                raise StoreError(
                    f"document lengths sum to {ends[-1] - self.bounds[-1]}, not {len(data)}"
                )
            self.bounds.extend(ends.tolist())

    def finish(self) -> dict[str, Any]:
        if self._file is None:
            self._open_next()
        self._close_shard()
        n = len(self.shard_sizes)
        shards = []
        for k, (size, digest) in enumerate(zip(self.shard_sizes, self._hashes)):
            name = _shard_name(k, n)
            os.replace(os.path.join(self.dir, f"shard-{k:05d}.tmp"), os.path.join(self.dir, name))
            shards.append({"file": name, "tokens": size, "sha256": digest})
        np.save(os.path.join(self.dir, "doc_offsets.npy"), np.asarray(self.bounds, dtype=np.int64))
        return {
            "documents": len(self.bounds) - 1,
            "tokens": self.bounds[-1],
            "dtype": self.dtype.name,
            "shard_tokens": self.shard_tokens,
            "shards": shards,
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: str) -> list[str]:
    """Delete ``OUT.partial-PID-*`` directories left by prepares that died (PID gone)."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if name.startswith(base + ".partial-"):
            try:
                pid = int(name[len(base) + len(".partial-") :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                removed.append(name)
    return removed


class StoreWriter:
    """Writes a store into ``OUT.partial-PID-RAND`` and renames it to ``OUT`` on commit.

    Usage::

        w = StoreWriter(out, vocab_info)
        sw = w.split_writer("train")
        for doc in docs: sw.write(np.append(ids, EOS))
        w.commit(manifest_extra)          # writes manifest.json, renames into place
    """

    def __init__(self, out_dir: str, vocab: VocabInfo, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise StoreError(f"shard_tokens={shard_tokens} must be >= 1")
        self.out_dir = os.path.abspath(out_dir)
        self.vocab = vocab
        self.dtype = vocab.token_dtype
        self.shard_tokens = shard_tokens
        os.makedirs(os.path.dirname(self.out_dir), exist_ok=True)
        remove_stale_partials(self.out_dir)
        self.tmp_dir = f"{self.out_dir}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.tmp_dir)
        self._writers: dict[str, _SplitWriter] = {}

    def split_writer(self, name: str) -> _SplitWriter:
        if name not in self._writers:
            self._writers[name] = _SplitWriter(self.tmp_dir, name, self.dtype, self.shard_tokens)
        return self._writers[name]

    def scratch_path(self, name: str) -> str:
        """A path inside the temporary directory for intermediate files (removed on commit)."""
        return os.path.join(self.tmp_dir, "_scratch", name)

    def commit(self, manifest: dict[str, Any], overwrite: bool = False) -> TokenStore:
        """Finish every split, write the manifest last, and atomically move into place."""
        full = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "vocab": self.vocab.to_dict(),
            "splits": {name: w.finish() for name, w in sorted(self._writers.items())},
        }
        shutil.rmtree(os.path.join(self.tmp_dir, "_scratch"), ignore_errors=True)
        tmp_manifest = os.path.join(self.tmp_dir, MANIFEST + ".tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(full, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, os.path.join(self.tmp_dir, MANIFEST))
        old = None
        if os.path.exists(self.out_dir):
            if not overwrite:
                raise StoreError(f"{self.out_dir} appeared while preparing; not overwriting it")
            old = f"{self.out_dir}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return TokenStore(self.out_dir)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
