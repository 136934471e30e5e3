"""File and dataset sources: ``json:GLOB`` (JSON lines, optionally ``.gz``), ``text:GLOB``
(plain text split into documents by a separator), ``tfds:NAME:VERSION`` and ``tfds_dir:PATH``.

A file whose name contains ``validation`` or ``valid`` is in the validation split. This module
imports tensorflow / tfds only inside the TFDS sources.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
from typing import Any

from repeat_scaling.data.sources import SPLITS, Source, SourceError
from repeat_scaling.errors import first_line

MALFORMED_JSON_MAX_FRACTION = 0.01


def _split_of_file(path: str) -> str:
    name = os.path.basename(path).lower()
    return "validation" if ("validation" in name or "valid" in name) else "train"


def _expand_glob(spec: str, pattern: str) -> list[str]:
    if not pattern:
        raise SourceError(f"source {spec!r} needs a file glob after the colon")
    files = sorted(
        p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not files:
        raise SourceError(f"source {spec!r}: the glob {pattern!r} matches no files")
    return files


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{where}: not valid UTF-8 (byte {data[e.start : e.start + 1]!r} at offset {e.start})"
        ) from None


class _FileSource(Source):
    def __init__(self, spec: str, pattern: str, **kw):
        super().__init__(spec, **kw)
        self.files = _expand_glob(spec, pattern)

    def native_splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if any(_split_of_file(f) == s for f in self.files))

    def _files_of(self, split: str) -> list[str]:
        return [f for f in self.files if _split_of_file(f) == split]

    def fingerprint(self) -> dict[str, Any]:
        files = []
        for f in self.files:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        return {"kind": self.kind, "files": files, **self._params()}

    def _params(self) -> dict[str, Any]:
        return {}


class JsonSource(_FileSource):
    """JSON lines, one document per line, text in ``text_field``; ``.gz`` is decompressed."""

    kind = "json"

    def __init__(self, spec: str, pattern: str, text_field: str = "text", **kw):
        super().__init__(spec, pattern, **kw)
        self.text_field = text_field
        self.stats.update(lines=0, malformed_lines=0)
        # (lines, malformed) per file read to its end: the stats count each file once,
        # however often the source is read (a validation carve-out reads it three times).
        self._file_counts: dict[str, tuple[int, int]] = {}

    def _params(self) -> dict[str, Any]:
        return {"text_field": self.text_field}

    def _iter_native(self, split):
        for path in self._files_of(split):
            base = os.path.basename(path)
            lines = bad = 0
            with _open_bytes(path) as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    lines += 1
                    line = _decode(raw, f"{path}:{lineno}")
                    try:
                        text = json.loads(line)[self.text_field]
                        if not isinstance(text, str):
                            raise TypeError
                    except (ValueError, KeyError, TypeError, IndexError):
                        bad += 1
                        self._check_malformed(path, lineno, lines, bad)
                        continue
                    yield f"{base}:{lineno}", text
                self._check_malformed(path, None, lines, bad)
            self._file_counts[path] = (lines, bad)
            self.stats["lines"] = sum(n for n, _ in self._file_counts.values())
            self.stats["malformed_lines"] = sum(b for _, b in self._file_counts.values())

    def _check_malformed(self, path: str, lineno: int | None, lines: int, malformed: int) -> None:
        done = [c for p, c in self._file_counts.items() if p != path]
        bad = malformed + sum(b for _, b in done)
        total = lines + sum(n for n, _ in done)
        # Judge the fraction once enough lines were read (or at the end of each file).
        if bad and (lineno is None or total >= 1000) and bad > MALFORMED_JSON_MAX_FRACTION * total:
            raise SourceError(
                f"{path}: {bad} of {total} JSON lines are malformed or lack a string field "
                f"{self.text_field!r} (more than {MALFORMED_JSON_MAX_FRACTION:.0%}); "
                "is --text_field right?"
            )


class TextSource(_FileSource):
    """Plain text files split into documents by ``separator`` (``blank``, ``file`` or a marker)."""

    kind = "text"

    def __init__(self, spec: str, pattern: str, text_separator: str = "blank", **kw):
        super().__init__(spec, pattern, **kw)
        if not text_separator:
            raise SourceError("text_separator must be 'blank', 'file' or a non-empty marker")
        self.separator = text_separator

    def _params(self) -> dict[str, Any]:
        return {"text_separator": self.separator}

    def _iter_native(self, split):
        for path in self._files_of(split):
            base = os.path.basename(path)
            with _open_bytes(path) as f:
                text = _decode(f.read(), path)
            if self.separator == "file":
                docs = [text]
            elif self.separator == "blank":
                docs = _split_blank_lines(text)
            else:
                docs = text.split(self.separator)
            for k, doc in enumerate(docs):
                yield f"{base}:{k}", doc.strip("\n")


def _split_blank_lines(text: str) -> list[str]:
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


class TfdsSource(Source):
    """A TFDS text dataset by name/version (``data_dir``) or from a prepared directory."""

    kind = "tfds"

    def __init__(
        self,
        spec: str,
        name: str | None = None,
        data_dir: str | None = None,
        directory: str | None = None,
        text_field: str = "text",
        **kw,
    ):
        super().__init__(spec, **kw)
        self.name, self.data_dir, self.directory, self.text_field = (
            name,
            data_dir,
            directory,
            text_field,
        )
        if directory is not None and not os.path.isdir(directory) and "://" not in directory:
            raise SourceError(f"source {spec!r}: TFDS directory {directory!r} does not exist")
        self._builder = None

    @property
    def builder(self):
        if self._builder is None:
            import tensorflow_datasets as tfds

            try:
                if self.directory is not None:
                    self._builder = tfds.builder_from_directory(self.directory)
                else:
                    self._builder = tfds.builder(self.name, data_dir=self.data_dir)
            except Exception as e:  # noqa: BLE001 - tfds raises many kinds
                msg = first_line(e)
                raise SourceError(f"source {self.spec!r}: TFDS cannot load it ({msg})") from None
            if not self._builder.info.splits:
                raise SourceError(
                    f"source {self.spec!r}: TFDS dataset has no prepared splits "
                    f"(data_dir={self.data_dir!r}); prepare it with tfds first"
                )
        return self._builder

    def native_splits(self):
        return tuple(s for s in SPLITS if s in self.builder.info.splits)

    def fingerprint(self):
        info = self.builder.info
        return {
            "kind": self.kind,
            "name": info.full_name,
            "data_dir": str(self.builder.data_dir),
            "splits": {s: int(info.splits[s].num_examples) for s in info.splits},
            "text_field": self.text_field,
        }

    def _iter_native(self, split):
        import tensorflow_datasets as tfds

        ds = self.builder.as_dataset(split=split, shuffle_files=False)
        if self.text_field not in ds.element_spec:
            raise SourceError(
                f"source {self.spec!r} has no feature {self.text_field!r}; "
                f"features: {sorted(ds.element_spec)}"
            )
        for i, ex in enumerate(tfds.as_numpy(ds)):
            value = ex[self.text_field]
            text = (
                _decode(value, f"{self.spec} {split}[{i}]")
                if isinstance(value, bytes)
                else str(value)
            )
            yield f"{split}:{i}", text
