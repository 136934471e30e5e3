"""Text sources: each yields ``(doc_id, text)`` pairs per split, deterministically.

Source specs (what ``--source`` accepts):

- ``json:GLOB``: JSON lines (``.json``, ``.jsonl``, optionally ``.gz``), e.g. the allenai C4
  shards ``c4-train.*.json.gz``; the text is read from ``text_field`` (default ``text``).
- ``text:GLOB``: plain text files; ``text_separator`` = ``blank`` (documents separated by
  blank lines, the default), ``file`` (one document per file) or any marker string such as
  ``<|endoftext|>``.
- ``tfds:NAME:VERSION`` (e.g. ``tfds:c4/en:3.1.0``) with ``tfds_data_dir`` (local or gs://),
  and ``tfds_dir:PATH``, a prepared TFDS directory (``tfds.builder_from_directory``).
- ``builtin``: the interpreter's own documentation: every ``pydoc`` topic and, per
  standard-library module, its docstrings (read with ``ast``, nothing is imported).
- ``pystdlib`` or ``pystdlib:key=value,...``: the Python standard library's own ``.py``
  source files, a code corpus that needs no download (see :class:`PyStdlibSource`).
- ``synthetic`` or ``synthetic:key=value,...``: a seeded toy language (see
  :class:`SyntheticSource`).

Splits are ``train`` and ``validation``. For files, a file whose name contains
``validation`` or ``valid`` belongs to the validation split, every other file to train.
A source without validation documents gets a deterministic carve-out: the
``validation_docs`` train documents with the smallest hash of their id (default 5% of the
documents, at most 10,000). Which documents are carved out depends only on their ids.

Bad input policy: no matching files, undecodable UTF-8 and (for JSON) more than 1% malformed
lines raise :class:`SourceError` with a one-line message; fewer malformed lines are skipped
and counted in ``source.stats``. Empty (whitespace-only) documents are skipped and counted.

The source families live in :mod:`repeat_scaling.data.file_sources` (json, text, TFDS),
:mod:`repeat_scaling.data.builtin_sources` (builtin, pystdlib) and
:mod:`repeat_scaling.data.synthetic_source`; this module holds what they share (the
:class:`Source` base class, :class:`SourceError`, :func:`doc_hash`) and :func:`parse_source`.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections.abc import Iterator
from typing import Any

SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.05
DEFAULT_VALIDATION_MAX = 10_000


class SourceError(ValueError):
    """A source spec or source data that cannot be used (one-line message)."""


def doc_hash(doc_id: str, salt: str = "") -> int:
    """A stable 64-bit hash of a document id (blake2b; independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(f"{salt}\x00{doc_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class Source:
    """Base class: subclasses implement ``native_splits`` and ``_iter_native``.

    Attributes:
      spec: the spec string the source was parsed from.
      stats: counters filled while iterating (skipped empty docs, malformed lines, ...).
    """

    kind = "source"

    def __init__(
        self,
        spec: str,
        validation_docs: int | None = None,
        max_docs: int | None = None,
    ):
        self.spec = spec
        if validation_docs is not None and validation_docs < 1:
            raise SourceError(f"validation_docs={validation_docs} must be >= 1 (or unset)")
        if max_docs is not None and max_docs < 1:
            raise SourceError(f"max_docs={max_docs} must be >= 1 (or unset)")
        self.validation_docs = validation_docs
        self.max_docs = max_docs
        self.stats: dict[str, int] = {"empty_documents_skipped": 0}
        self._carved: frozenset[str] | None = None

    # -- to implement ---------------------------------------------------------------------
    def native_splits(self) -> tuple[str, ...]:
        """Splits the underlying data has (a subset of ``SPLITS``)."""
        raise NotImplementedError

    def _iter_native(self, split: str) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the data (files, sizes, mtimes / names, versions, params)."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "carved_validation": self.carves_validation}

    @property
    def carves_validation(self) -> bool:
        return "validation" not in self.native_splits()

    def _iter_capped(self, split: str) -> Iterator[tuple[str, str]]:
        n = 0
        for doc_id, text in self._iter_native(split):
            if not text.strip():
                self.stats["empty_documents_skipped"] += 1
                continue
            yield doc_id, text
            n += 1
            if self.max_docs is not None and n >= self.max_docs:
                return

    def _carve_ids(self) -> frozenset[str]:
        if self._carved is None:
            ids = self._train_ids()
            if not ids:
                raise SourceError(f"source {self.spec!r} yielded no training documents")
            n = self.validation_docs
            if n is None:
                n = max(
                    1, min(DEFAULT_VALIDATION_MAX, round(DEFAULT_VALIDATION_FRACTION * len(ids)))
                )
            if n >= len(ids):
                raise SourceError(
                    f"validation_docs={n} leaves no training documents: source {self.spec!r} "
                    f"has only {len(ids)} documents"
                )
            self._carved = frozenset(
                heapq.nsmallest(n, ids, key=lambda d: doc_hash(d, "validation"))
            )
        return self._carved

    def _train_ids(self) -> list[str]:
        """Ids of every (capped, non-empty) native train document; subclasses may shortcut."""
        return [doc_id for doc_id, _ in self._iter_capped("train")]

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        """Yield ``(doc_id, text)`` of ``split`` ("train" or "validation") in a fixed order."""
        if split not in SPLITS:
            raise SourceError(f"split {split!r} is not one of {SPLITS}")
        if not self.carves_validation:
            yield from self._iter_capped(split)
            return
        carved = self._carve_ids()
        for doc_id, text in self._iter_capped("train"):
            if (doc_id in carved) == (split == "validation"):
                yield doc_id, text


def _parse_params(spec: str, rest: str, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``k=v,k=v`` after a spec's colon -> ``defaults`` updated, values cast to their types."""
    p = dict(defaults)
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not eq:
            raise SourceError(f"source {spec!r}: {what} parameters must be key=value, got {item!r}")
        if k not in p:
            raise SourceError(
                f"source {spec!r}: unknown {what} parameter {k!r}; expected one of {sorted(p)}"
            )
        try:
            p[k] = type(defaults[k])(v)
        except ValueError:
            raise SourceError(f"source {spec!r}: parameter {k}={v!r} is not a number") from None
    return p


# --------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------


def parse_source(
    spec: str,
    *,
    text_field: str = "text",
    tfds_data_dir: str | None = None,
    text_separator: str = "blank",
    validation_docs: int | None = None,
    max_docs: int | None = None,
) -> Source:
    """Parse a ``--source`` spec (see the module docstring) into a :class:`Source`."""
    # The families import this module (Source, SourceError): import them here, not at the top.
    from repeat_scaling.data.builtin_sources import BuiltinSource, PyStdlibSource
    from repeat_scaling.data.file_sources import JsonSource, TextSource, TfdsSource
    from repeat_scaling.data.synthetic_source import SyntheticSource

    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(
            "source spec is empty; expected json:GLOB, text:GLOB, tfds:NAME:VERSION, "
            "tfds_dir:PATH, builtin, pystdlib or synthetic"
        )
    kind, _, rest = spec.partition(":")
    common = {"validation_docs": validation_docs, "max_docs": max_docs}
    if kind == "json":
        return JsonSource(spec, rest, text_field=text_field, **common)
    if kind == "text":
        return TextSource(spec, rest, text_separator=text_separator, **common)
    if kind == "tfds":
        name, _, version = rest.rpartition(":")
        if not name or not version:
            raise SourceError(f"source {spec!r}: expected tfds:NAME:VERSION, e.g. tfds:c4/en:3.1.0")
        return TfdsSource(
            spec, name=f"{name}:{version}", data_dir=tfds_data_dir, text_field=text_field, **common
        )
    if kind == "tfds_dir":
        if not rest:
            raise SourceError(f"source {spec!r}: expected tfds_dir:PATH")
        return TfdsSource(spec, directory=os.path.expanduser(rest), text_field=text_field, **common)
    if kind == "builtin" and not rest:
        return BuiltinSource(spec, **common)
    if kind == "synthetic":
        return SyntheticSource(
            spec, _parse_params(spec, rest, SyntheticSource.PARAMS, kind), **common
        )
    if kind == "pystdlib":
        return PyStdlibSource(
            spec, _parse_params(spec, rest, PyStdlibSource.PARAMS, kind), **common
        )
    raise SourceError(
        f"unknown source {spec!r}; expected json:GLOB, text:GLOB, tfds:NAME:VERSION, "
        "tfds_dir:PATH, builtin, pystdlib[:k=v,...] or synthetic[:k=v,...]"
    )
