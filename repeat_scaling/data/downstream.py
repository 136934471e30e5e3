"""Downstream text-to-text tasks (T5 style) and the references of their "pairs" stores.

A *task* yields examples ``(inputs, targets, answers)`` of text per split ("train",
"validation"); ``answers`` are every acceptable answer text (for exact match / F1) and
default to ``[targets]``. :func:`repeat_scaling.prepare_tasks.prepare_task_store` tokenizes a task
into a token store of fixed-size pairs (layout below) and writes the texts beside it as
``<split>.references.jsonl``, which :func:`load_references` reads back.

Task specs (what ``--task`` accepts):

- a registered TFDS task by name, read with ``tfds_data_dir`` (the dataset must be prepared
  there, e.g. ``tfds build squad --data_dir=DIR``):

  - ``squad``: inputs ``"question: Q context: C"``, targets = the first answer text,
    answers = all answer texts (examples without an answer are skipped and counted);
  - ``glue/sst2``, ``glue/cola``, ``glue/mrpc``, ``glue/rte``, ``glue/qnli``,
    ``glue/mnli``: T5's GLUE format ``"sst2 sentence: S"`` (``"mrpc sentence1: A
    sentence2: B"``, ...) -> the label name (``negative`` / ``positive``, ...); examples
    with label -1 (unlabelled test data) are skipped. ``glue/mnli`` validates on
    ``validation_matched``.

  Add more with :func:`register_tfds_task` (a TFDS name, a converter from one numpy
  example to a :class:`PairExample` or None, and an optional split map).
- ``pairs_jsonl:GLOB``: local JSON lines with string fields ``"inputs"`` and ``"targets"``
  and optionally ``"answers"`` (a list of strings); a file whose name contains
  ``validation`` / ``valid`` is the validation split, as for the ``json:`` source, else
  the usual deterministic carve-out (``validation_docs``, default 5%) makes one.
- ``builtin_task:NAME[:k=v,...]``: small learnable tasks built from the distinct lowercase
  words (``min_len``..``max_len`` letters, default 3..8; 1883 words on Python 3.11) of the
  ``builtin`` corpus's pydoc topics (the interpreter's own language reference), so they
  need no download: ``copy_word``
  (``"copy: word"`` -> ``"word"``), ``reverse_word`` (``"reverse: word"`` -> ``"drow"``)
  and ``upper_word`` (``"upper: word"`` -> ``"WORD"``). Parameters ``min_len``,
  ``max_len``, ``max_words`` (0 = all) and ``validation_words`` (default 5% of the words,
  chosen by a hash of the word, so train and validation words never overlap).

Store layout (``manifest["pairs"]``): every example is one store document of exactly
``inputs_length + targets_length`` tokens, the encoded inputs + EOS truncated (keeping the
EOS last) or padded with 0 to ``inputs_length``, then the targets + EOS likewise to
``targets_length``; the store's own EOS follows, so example ``c`` is chunk ``c`` of
``raw_length = inputs_length + targets_length + 1`` tokens, in the task's order.

Only the TFDS tasks import tensorflow / tfds, lazily inside their methods; this module is
safe to import from training and evaluation code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from repeat_scaling.data import file_sources
from repeat_scaling.data import sources as sources_lib
from repeat_scaling.errors import first_line

SPLITS = sources_lib.SPLITS
TaskError = sources_lib.SourceError  # one-line ValueError, like every data-spec error


def references_path(store_dir: str | os.PathLike, split: str) -> str:
    """Path of ``split``'s references file inside a pairs store directory."""
    return os.path.join(os.fspath(store_dir), f"{split}.references.jsonl")


def load_references(store_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The references of a pairs store split: ``[{"index", "inputs", "targets", "answers"}]``.

    ``index`` c is the store chunk (example) c of the split; the texts are the task's,
    before tokenization and truncation.
    """
    path = references_path(store_dir, split)
    if not os.path.isfile(path):
        raise TaskError(
            f"{path} does not exist: {os.fspath(store_dir)!r} is not a pairs store with a "
            f"{split!r} split (prepare one with python -m repeat_scaling.prepare --task=...)"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One text-to-text example; ``answers`` are all acceptable outputs (default: targets)."""

    inputs: str
    targets: str
    answers: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.answers:
            object.__setattr__(self, "answers", (self.targets,))


class Task:
    """Base class: ``examples(split)`` in a fixed order, ``fingerprint()``, ``stats``."""

    kind = "task"

    def __init__(self, spec: str):
        self.spec = spec
        self.stats: dict[str, int] = {}

    def examples(self, split: str) -> Iterator[PairExample]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the task's data (for prepare's idempotence)."""
        raise NotImplementedError

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1


# --------------------------------------------------------------------------------------
# TFDS tasks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsTaskDef:
    """A registered TFDS task: dataset name, converter and split map (ours -> TFDS's)."""

    tfds_name: str
    convert: Callable[[dict[str, Any], Any], PairExample | None]
    split_map: tuple[tuple[str, str], ...] = ()


TFDS_TASKS: dict[str, TfdsTaskDef] = {}


def register_tfds_task(
    name: str,
    tfds_name: str,
    convert: Callable[[dict[str, Any], Any], PairExample | None],
    split_map: dict[str, str] | None = None,
) -> None:
    """Register a TFDS task: ``convert(example, builder_info)`` -> PairExample or None (skip).

    ``example`` is one ``tfds.as_numpy`` element (text features are ``bytes``).
    """
    TFDS_TASKS[name] = TfdsTaskDef(tfds_name, convert, tuple((split_map or {}).items()))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _squad(ex: dict[str, Any], info: Any) -> PairExample | None:
    answers = tuple(_text(a) for a in ex["answers"]["text"])
    if not answers:
        return None
    inputs = f"question: {_text(ex['question'])} context: {_text(ex['context'])}"
    return PairExample(inputs, answers[0], answers)


def _glue(benchmark: str, keys: tuple[str, ...]):
    """T5's GLUE text-to-text format: ``"{benchmark} {key}: {text} ..."`` -> label name."""

    def convert(ex: dict[str, Any], info: Any) -> PairExample | None:
        label = int(ex["label"])
        if label < 0:
            return None  # unlabelled (test) example
        names = info.features["label"].names
        inputs = " ".join([benchmark] + [f"{k}: {_text(ex[k])}" for k in keys])
        return PairExample(inputs, names[label])

    return convert


register_tfds_task("squad", "squad", _squad)
for _name, _keys in {
    "sst2": ("sentence",),
    "cola": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
}.items():
    register_tfds_task(
        f"glue/{_name}",
        f"glue/{_name}",
        _glue(_name, _keys),
        {"validation": "validation_matched"} if _name == "mnli" else None,
    )


class TfdsTask(Task):
    """A registered TFDS task read from ``data_dir`` (never downloads)."""

    kind = "tfds"

    def __init__(self, spec: str, definition: TfdsTaskDef, data_dir: str | None = None):
        super().__init__(spec)
        self.definition = definition
        self.data_dir = data_dir
        self._builder = None

    @property
    def builder(self):
        if self._builder is None:
            import tensorflow_datasets as tfds

            try:
                self._builder = tfds.builder(self.definition.tfds_name, data_dir=self.data_dir)
            except Exception as e:  # noqa: BLE001 - tfds raises many kinds
                msg = first_line(e)
                raise TaskError(f"task {self.spec!r}: TFDS cannot load it ({msg})") from None
        return self._builder

    def fingerprint(self) -> dict[str, Any]:
        info = self.builder.info
        return {
            "kind": self.kind,
            "task": self.spec,
            "name": info.full_name,
            "data_dir": str(self.builder.data_dir),
            "splits": {s: int(info.splits[s].num_examples) for s in info.splits},
        }

    def examples(self, split: str) -> Iterator[PairExample]:
        import tensorflow_datasets as tfds

        tfds_split = dict(self.definition.split_map).get(split, split)
        try:
            ds = self.builder.as_dataset(split=tfds_split, shuffle_files=False)
        except Exception as e:  # noqa: BLE001
            msg = first_line(e)
            raise TaskError(
                f"task {self.spec!r}: TFDS split {tfds_split!r} of "
                f"{self.definition.tfds_name!r} is not readable in data_dir={self.data_dir!r} "
                f"({msg}); prepare it with: tfds build {self.definition.tfds_name} "
                f"--data_dir=DIR"
            ) from None
        info = self.builder.info
        for ex in tfds.as_numpy(ds):
            pair = self.definition.convert(ex, info)
            if pair is None:
                self._count(f"{split}_skipped")
                continue
            yield pair


# --------------------------------------------------------------------------------------
# local JSON-lines task
# --------------------------------------------------------------------------------------


class _PairsLines(file_sources._FileSource):
    """The raw lines of pairs files as documents: file splits or carve-out, from sources."""

    kind = "pairs_jsonl"

    def _iter_native(self, split):
        for path in self._files_of(split):
            base = os.path.basename(path)
            with file_sources._open_bytes(path) as f:
                for lineno, raw in enumerate(f, 1):
                    if raw.strip():
                        yield f"{base}:{lineno}", file_sources._decode(raw, f"{path}:{lineno}")


class PairsJsonlTask(Task):
    """JSON lines with ``inputs``, ``targets`` and optional ``answers`` (see module doc)."""

    kind = "pairs_jsonl"

    def __init__(self, spec: str, pattern: str, validation_docs: int | None = None):
        super().__init__(spec)
        self.lines = _PairsLines(spec, pattern, validation_docs=validation_docs)

    def fingerprint(self) -> dict[str, Any]:
        return self.lines.fingerprint()

    def examples(self, split: str) -> Iterator[PairExample]:
        for doc_id, line in self.lines.documents(split):
            where = f"task {self.spec!r} line {doc_id}"
            try:
                d = json.loads(line)
            except ValueError:
                raise TaskError(f"{where} is not JSON") from None
            if not isinstance(d, dict) or not all(
                isinstance(d.get(k), str) for k in ("inputs", "targets")
            ):
                raise TaskError(f'{where} needs string fields "inputs" and "targets"')
            answers = d.get("answers", [])
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise TaskError(f'{where}: "answers" must be a list of strings')
            yield PairExample(d["inputs"], d["targets"], tuple(answers))


# --------------------------------------------------------------------------------------
# built-in word tasks
# --------------------------------------------------------------------------------------

BUILTIN_TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "copy_word": ("copy", lambda w: w),
    "reverse_word": ("reverse", lambda w: w[::-1]),
    "upper_word": ("upper", str.upper),
}


@functools.lru_cache(maxsize=4)
def builtin_words(min_len: int = 3, max_len: int = 8) -> tuple[str, ...]:
    """Distinct lowercase ASCII words of the ``builtin`` corpus's pydoc topics, sorted.

    The topics (the interpreter's language reference) load in milliseconds, unlike the
    corpus's stdlib docstrings; Python 3.11 has 1883 such words of 3-8 letters.
    """
    from pydoc_data.topics import topics

    pattern = re.compile(rf"\b[a-z]{{{min_len},{max_len}}}\b")
    return tuple(sorted({w for name in topics for w in pattern.findall(topics[name])}))


class BuiltinWordTask(Task):
    """``builtin_task:NAME``: a word-level transformation of the builtin corpus's words."""

    kind = "builtin_task"
    PARAMS = {"min_len": 3, "max_len": 8, "max_words": 0, "validation_words": 0}

    def __init__(self, spec: str, name: str, params: dict[str, Any]):
        super().__init__(spec)
        if name not in BUILTIN_TASKS:
            raise TaskError(
                f"task {spec!r}: unknown builtin task {name!r}; expected one of "
                f"{sorted(BUILTIN_TASKS)}"
            )
        p = params
        if not 1 <= p["min_len"] <= p["max_len"] or p["max_words"] < 0:
            raise TaskError(
                f"task {spec!r}: need 1 <= min_len <= max_len and max_words >= 0, got {p}"
            )
        self.name, self.params = name, p
        self.prefix, self.fn = BUILTIN_TASKS[name]
        words = builtin_words(p["min_len"], p["max_len"])
        if p["max_words"]:  # a hash-chosen subset, stable under changes of max_words
            words = sorted(sorted(words, key=sources_lib.doc_hash)[: p["max_words"]])
        n_val = p["validation_words"] or max(1, round(0.05 * len(words)))
        if len(words) < 2 or n_val >= len(words):
            raise TaskError(
                f"task {spec!r}: {len(words)} words cannot make {n_val} validation words and "
                "a training split; lower validation_words or widen min_len/max_len"
            )
        val = set(sorted(words, key=lambda w: sources_lib.doc_hash(w, "validation"))[:n_val])
        self.words = {
            "train": [w for w in words if w not in val],
            "validation": [w for w in words if w in val],
        }

    def fingerprint(self) -> dict[str, Any]:
        import sys

        return {"kind": self.kind, "task": self.name, "python": sys.version, **self.params}

    def examples(self, split: str) -> Iterator[PairExample]:
        for w in self.words[split]:
            yield PairExample(f"{self.prefix}: {w}", self.fn(w))


# --------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------


def task_names() -> list[str]:
    """Every accepted task spec form, for error messages and --help."""
    return [
        *sorted(TFDS_TASKS),
        "pairs_jsonl:GLOB",
        *(f"builtin_task:{n}" for n in sorted(BUILTIN_TASKS)),
    ]


def parse_task(
    spec: str, *, tfds_data_dir: str | None = None, validation_docs: int | None = None
) -> Task:
    """Parse a ``--task`` spec (see the module docstring) into a :class:`Task`."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"task spec is empty; expected one of {task_names()}")
    if spec in TFDS_TASKS:
        return TfdsTask(spec, TFDS_TASKS[spec], tfds_data_dir)
    kind, _, rest = spec.partition(":")
    if kind == "pairs_jsonl":
        return PairsJsonlTask(spec, rest, validation_docs=validation_docs)
    if kind == "builtin_task":
        name, _, params = rest.partition(":")
        p = sources_lib._parse_params(spec, params, BuiltinWordTask.PARAMS, "builtin_task")
        return BuiltinWordTask(spec, name, p)
    raise TaskError(f"unknown task {spec!r}; expected one of {task_names()}")
