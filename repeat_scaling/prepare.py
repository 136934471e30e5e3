r"""Tokenize a text source once into a token store.

    python -m repeat_scaling.prepare --source=SPEC --vocab=VOCAB --out=DIR

SPEC is ``json:GLOB`` (``--text_field``), ``text:GLOB`` (``--text_separator``),
``tfds:NAME:VERSION`` (``--tfds_data_dir``), ``tfds_dir:PATH``, ``builtin``,
``pystdlib[:k=v,...]`` or ``synthetic[:k=v,...]`` (see :mod:`repeat_scaling.data.sources`);
VOCAB is ``byte`` or a SentencePiece ``.model`` path.

A downstream task becomes a "pairs" store of fixed-size (inputs, targets) examples instead
(:func:`repeat_scaling.prepare_tasks.prepare_task_store`, layout in
:mod:`repeat_scaling.data.downstream`)::

    python -m repeat_scaling.prepare --task=squad --vocab=VOCAB --out=DIR \
        --inputs_length=512 --targets_length=32 [--tfds_data_dir=DIR] [--max_examples=N]
 Flags may come from an ml_collections config file instead
(``--config=path/to/cfg.py``, fields named like the flags); explicit flags win.

What it does, per split (train, validation):

1. reads the documents (a deterministic carve-out makes the validation split when the
   source has none, ``--validation_docs``; ``--max_docs`` caps each split);
2. tokenizes them in chunks with ``--num_workers`` processes (order preserved), appending
   EOS to each document, into a scratch file, with a progress bar on stderr;
3. orders the documents by a seeded hash of their id (``--seed``) and writes them
   concatenated into the store's shards.

The store is written to a temporary directory and renamed into place at the end, so an
interrupted run leaves nothing that looks complete. Re-running with the same arguments on
an unchanged source is a no-op (the manifest keeps a fingerprint of the request).
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from repeat_scaling import cli
from repeat_scaling.data import sources as sources_lib
from repeat_scaling.data import store as store_lib
from repeat_scaling.data.vocab import EOS_ID, Encoder, VocabInfo, load_vocab_info
from repeat_scaling.errors import first_line

PREPARE_VERSION = 1
DEFAULT_CHUNK_DOCS = 256
WRITE_BLOCK_DOCS = 1024
PIPELINE_DEPTH = 4  # chunks in flight in the single-worker pipeline


# -- worker side ----------------------------------------------------------------------------

_ENCODER: Encoder | None = None


def _init_worker(info: VocabInfo) -> None:
    global _ENCODER
    _ENCODER = Encoder(info)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, bytes]:
    """Encode a chunk of documents -> (int64 lengths incl. EOS, concatenated ids as bytes)."""
    enc = _ENCODER
    dtype = enc.info.token_dtype
    arrays = enc.encode_batch(texts)
    lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for a in arrays:
        out[pos : pos + len(a)] = a
        pos += len(a)
        out[pos] = EOS_ID
        pos += 1
    return lengths, out.tobytes()


def _threaded_map(chunks):
    """``map(_encode_chunk, chunks)`` in one background thread, order kept.

    SentencePiece releases the GIL while encoding, so reading and parsing the next chunks
    in this thread overlaps with tokenization: one worker, tokenizer-bound.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as ex:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(ex.submit(_encode_chunk, chunk))
            if len(pending) >= PIPELINE_DEPTH:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- library ---------------------------------------------------------------------------------


def _chunks(docs: Iterator[tuple[str, str]], size: int, keys: list[int], salt: str, counter: dict):
    ids_texts: list[str] = []
    for doc_id, text in docs:
        keys.append(sources_lib.doc_hash(doc_id, salt))
        ids_texts.append(text)
        counter["chars"] += len(text)
        if len(ids_texts) == size:
            yield ids_texts
            ids_texts = []
    if ids_texts:
        yield ids_texts


def request_fingerprint(source_fp: dict, vocab: VocabInfo, options: dict) -> str:
    """The manifest's ``request_fingerprint``: what a store was made from (this module's
    version, the source, the vocabulary, the options)."""
    vocab_id = {k: v for k, v in vocab.to_dict().items() if k != "path"}
    blob = json.dumps(
        {
            "prepare_version": PREPARE_VERSION,
            "source": source_fp,
            "vocab": vocab_id,
            "options": options,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_store(
    out_dir: str, fingerprint: str, overwrite: bool, log
) -> tuple[store_lib.TokenStore | None, bool]:
    """Prepare's idempotence check on ``out_dir`` -> ``(up-to-date store or None, overwrite)``.

    A store with the same request fingerprint is returned as is (re-running is a no-op); a
    store from other inputs is an error unless ``overwrite``; a non-store directory is an
    error; an empty directory is removed (and may then be replaced).
    """
    if not os.path.exists(out_dir):
        return None, overwrite
    if os.path.isfile(os.path.join(out_dir, store_lib.MANIFEST)):
        existing = store_lib.TokenStore(out_dir)
        if existing.manifest.get("request_fingerprint") == fingerprint:
            try:
                existing.verify(cached=False)  # every shard's sha256, read in full
            except store_lib.StoreError as e:
                if not overwrite:
                    raise store_lib.StoreError(
                        f"{out_dir} is corrupt ({e}); pass --overwrite to rebuild it"
                    ) from None
                log(f"prepare: {out_dir} is corrupt ({e}); rebuilding it")
                return None, overwrite
            log(
                f"prepare: {out_dir} is up to date (same source, vocabulary and options, "
                "shards verified); nothing to do"
            )
            return existing, overwrite
        if not overwrite:
            raise store_lib.StoreError(
                f"{out_dir} holds a store prepared from different inputs "
                f"({existing.manifest['source']['spec']!r}, {existing.vocab.describe()}); "
                "pass --overwrite or choose another --out"
            )
        return None, overwrite
    if os.listdir(out_dir):
        raise store_lib.StoreError(
            f"--out {out_dir} exists and is not a token store; choose another --out"
        )
    os.rmdir(out_dir)
    return None, True


def prepare_store(
    source_spec: str,
    vocab_spec: str | VocabInfo,
    out_dir: str | os.PathLike,
    *,
    num_workers: int = 1,
    seed: int = 0,
    validation_docs: int | None = None,
    max_docs: int | None = None,
    text_field: str = "text",
    text_separator: str = "blank",
    tfds_data_dir: str | None = None,
    shard_tokens: int = store_lib.DEFAULT_SHARD_TOKENS,
    chunk_docs: int = DEFAULT_CHUNK_DOCS,
    overwrite: bool = False,
    progress: bool = True,
    log=None,
) -> store_lib.TokenStore:
    """Prepare (or reuse) the token store for ``source_spec`` x ``vocab_spec`` at ``out_dir``.

    Args:
      num_workers: tokenizer processes; 1 tokenizes in this process (in one background
        thread that overlaps with reading), 0 picks automatically
        (1 for the byte vocabulary, else one per CPU but one, up to 16).
      seed: seeds the document order (a hash of ``seed`` and each document id).
      validation_docs / max_docs / text_field / text_separator / tfds_data_dir: passed to
        :func:`repeat_scaling.data.sources.parse_source`.
      shard_tokens: tokens per shard file.
      overwrite: replace an existing store prepared from different inputs.
      progress: show a tqdm bar on stderr.
      log: callable for one-line status messages (default: print to stderr).

    Returns:
      The :class:`TokenStore` at ``out_dir``.

    Raises:
      ValueError subclasses (SourceError, VocabError, StoreError) with one-line messages.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if isinstance(source_spec, str) and source_spec.startswith("icl_"):
        # Synthetic in-context-learning tasks generate token ids, not text: their own writer.
        from repeat_scaling.data.icl_store import prepare_icl_store

        return prepare_icl_store(source_spec, out_dir, seed=seed, overwrite=overwrite, log=log)
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 = automatic)")
    if chunk_docs < 1:
        raise ValueError(f"chunk_docs={chunk_docs} must be >= 1")
    vocab = load_vocab_info(vocab_spec)
    source = sources_lib.parse_source(
        source_spec,
        text_field=text_field,
        tfds_data_dir=tfds_data_dir,
        text_separator=text_separator,
        validation_docs=validation_docs,
        max_docs=max_docs,
    )
    options = {
        "seed": seed,
        "validation_docs": validation_docs,
        "max_docs": max_docs,
        "shard_tokens": shard_tokens,
    }
    fingerprint = request_fingerprint(source.fingerprint(), vocab, options)
    existing, overwrite = existing_store(out_dir, fingerprint, overwrite, log)
    if existing is not None:
        return existing

    if num_workers == 0:
        # One CPU stays with the main process (reading, parsing, writing).
        num_workers = 1 if vocab.kind == "byte" else max(1, min(16, (os.cpu_count() or 1) - 1))

    t0 = time.time()
    writer = store_lib.StoreWriter(out_dir, vocab, shard_tokens=shard_tokens)
    pool = None
    try:
        if num_workers > 1:
            import multiprocessing

            # spawn: safe even when the caller already started threads (jax, tf).
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(vocab,))
            encode_map = lambda chunks: pool.imap(_encode_chunk, chunks)  # noqa: E731
        else:
            _init_worker(vocab)
            encode_map = _threaded_map
        split_stats = {}
        for split in sources_lib.SPLITS:
            split_stats[split] = _prepare_split(
                source, split, writer, encode_map, seed, chunk_docs, progress, vocab
            )
        elapsed = time.time() - t0
        manifest = {
            "request_fingerprint": fingerprint,
            "prepare_version": PREPARE_VERSION,
            "source": {
                **source.describe(),
                "fingerprint": source.fingerprint(),
                "stats": source.stats,
            },
            "options": {
                **options,
                "text_field": text_field,
                "text_separator": text_separator,
                "tfds_data_dir": tfds_data_dir,
                "num_workers": num_workers,
            },
            "split_text_chars": {s: v["chars"] for s, v in split_stats.items()},
            "elapsed_s": round(elapsed, 3),
        }
        store = writer.commit(manifest, overwrite=overwrite)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for split in store.split_names:
        sp = store.split(split)
        log(
            f"prepare: {split}: {sp.num_documents} documents, {sp.num_tokens} tokens ({sp.dtype.name})"
        )
    log(f"prepare: wrote {out_dir} in {elapsed:.1f}s")
    return store


def ensure_store(data: Any, *, build: bool = True) -> bool:
    """Make the ``data`` config's ``data.store`` a prepared token store: when it has no
    manifest.json, prepare it from ``data.source`` / ``data.vocab`` (``data.prepare_options``:
    extra :func:`prepare_store` keyword arguments).

    Returns whether the store was missing. ``build=False`` only checks that a missing
    store can be prepared (the processes of a multi-host trainer but one).

    Raises:
      RunDataError (``repeat_scaling.data.run_data``, one line): a missing store with no
        ``data.source``, no ``data.vocab``, or a SentencePiece file that does not exist.
      WorkdirError: ``data.store`` is a URL.
    """
    from repeat_scaling.data.run_data import RunDataError, store_path

    path = store_path(data)
    if (path / "manifest.json").is_file():
        return False
    if not data.source:
        raise RunDataError(
            f"data.store={str(path)!r} is not a prepared token store (no manifest.json) "
            "and no data.source is given to prepare it"
        )
    if not data.vocab:
        raise RunDataError(f"data.source={data.source!r} needs data.vocab to prepare")
    vocab_file = os.path.expanduser(str(data.vocab))
    if vocab_file.endswith(".model") and not os.path.isfile(vocab_file):
        # before any work: a missing vocabulary file is one line, not a traceback
        raise RunDataError(
            f"data.store={str(path)!r} is not prepared and cannot be built here: "
            f"data.vocab={data.vocab!r} does not exist (copy the prepared store to this "
            "path, or set data.vocab to the vocabulary file)"
        )
    if build:
        prepare_store(data.source, data.vocab, str(path), **dict(data.prepare_options))
    return True


def _prepare_split(source, split, writer, encode_map, seed, chunk_docs, progress, vocab):
    from tqdm import tqdm

    keys: list[int] = []
    counter = {"chars": 0}
    lengths_parts: list[np.ndarray] = []
    scratch = writer.scratch_path(f"{split}.raw")
    os.makedirs(os.path.dirname(scratch), exist_ok=True)
    docs = source.documents(split)
    bar = tqdm(
        desc=f"tokenize {split}", unit="doc", disable=not progress, file=sys.stderr, mininterval=0.5
    )
    with open(scratch, "wb") as raw, bar:
        for lengths, data in encode_map(
            _chunks(docs, chunk_docs, keys, f"shuffle:{seed}", counter)
        ):
            lengths_parts.append(lengths)
            raw.write(data)
            bar.update(len(lengths))
    if not keys:
        raise sources_lib.SourceError(f"source {source.spec!r} yielded no {split} documents")
    lengths = np.concatenate(lengths_parts)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    # Seeded shuffle: order documents by the hash of (seed, doc id); ties keep source order.
    order = np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")
    sw = writer.split_writer(split)
    with open(scratch, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if bounds[-1] else None
        tokens = np.frombuffer(mm, dtype=vocab.token_dtype) if mm is not None else np.zeros(0)
        for k in range(0, len(order), WRITE_BLOCK_DOCS):
            block = order[k : k + WRITE_BLOCK_DOCS]
            sw.write(
                np.concatenate([tokens[bounds[i] : bounds[i + 1]] for i in block]), lengths[block]
            )
        del tokens
        if mm is not None:
            mm.close()
    os.remove(scratch)
    return {"chars": counter["chars"]}


# -- command line ----------------------------------------------------------------------------

_FLAG_NAMES = (
    "source", "vocab", "out", "num_workers", "seed", "validation_docs", "max_docs",
    "text_field", "text_separator", "tfds_data_dir", "shard_tokens", "overwrite",
    "task", "inputs_length", "targets_length", "max_examples",
)  # fmt: skip
_TASK_FLAGS = ("task", "inputs_length", "targets_length", "max_examples")
# Flags a --task run accepts besides _TASK_FLAGS (the rest concern text sources only).
_TASK_SHARED_FLAGS = ("vocab", "out", "tfds_data_dir", "validation_docs", "overwrite")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if "source" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "source",
        None,
        "json:GLOB | text:GLOB | tfds:NAME:VERSION | tfds_dir:PATH | builtin | "
        "pystdlib[:k=v,...] | synthetic[:k=v,...]",
    )
    flags.DEFINE_string(
        "task",
        None,
        "instead of --source: a downstream task (squad | glue/sst2 | pairs_jsonl:GLOB | "
        "builtin_task:copy_word ...) prepared as a pairs store",
    )
    flags.DEFINE_integer("inputs_length", None, "--task: tokens per example's inputs (EOS incl.)")
    flags.DEFINE_integer("targets_length", None, "--task: tokens per example's targets (EOS incl.)")
    flags.DEFINE_integer("max_examples", None, "--task: cap on examples per split")
    flags.DEFINE_string("vocab", None, "'byte' or a SentencePiece .model path")
    flags.DEFINE_string("out", None, "output token store directory")
    flags.DEFINE_integer(
        "num_workers", 0, "tokenizer processes (0 = auto: 1 for byte, else #CPUs - 1, at most 16)"
    )
    flags.DEFINE_integer("seed", 0, "seed of the document order")
    flags.DEFINE_integer(
        "validation_docs",
        None,
        "documents carved off for validation when the source has no validation split",
    )
    flags.DEFINE_integer("max_docs", None, "cap on documents per split")
    flags.DEFINE_string("text_field", "text", "JSON / TFDS feature holding the text")
    flags.DEFINE_string(
        "text_separator", "blank", "text sources: 'blank', 'file' or a marker like <|endoftext|>"
    )
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (local or gs://) for tfds: sources")
    flags.DEFINE_integer("shard_tokens", store_lib.DEFAULT_SHARD_TOKENS, "tokens per shard file")
    flags.DEFINE_boolean("overwrite", False, "replace an existing store made from other inputs")
    flags.DEFINE_boolean("progress", True, "show a progress bar on stderr")
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file with the same fields"
    )


def resolve_options(flag_values, names=_FLAG_NAMES) -> dict[str, Any]:
    """Merge ``--config`` fields (if any) under explicitly given flags."""
    opts = {n: flag_values[n].value for n in names}
    cfg = flag_values["config"].value
    if cfg is not None:
        for key, value in cfg.items():
            if key not in names:
                raise ValueError(
                    f"--config field {key!r} is not a prepare option; expected one of {list(names)}"
                )
            if not flag_values[key].present:
                opts[key] = value
    return opts


def _main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected positional arguments {argv[1:]}")
    opts = resolve_options(flags.FLAGS)
    if opts["task"]:
        if opts["source"]:
            raise ValueError("give either --source (a text corpus) or --task (a task), not both")
        for required in ("vocab", "out", "inputs_length", "targets_length"):
            if not opts[required]:
                raise ValueError(f"--{required} is required with --task (or set it in --config)")
        from repeat_scaling.prepare_tasks import prepare_task_store

        prepare_task_store(
            opts["task"],
            opts["vocab"],
            opts["out"],
            **{k: opts[k] for k in _TASK_FLAGS[1:] + _TASK_SHARED_FLAGS[2:]},
        )
        return
    for k in _TASK_FLAGS[1:]:
        if opts[k] is not None:
            raise ValueError(f"--{k} only applies with --task")
    for k in _TASK_FLAGS:
        opts.pop(k)
    for required in ("source", "vocab", "out"):
        if not opts[required]:
            raise ValueError(f"--{required} is required (or set it in --config)")
    prepare_store(
        opts.pop("source"),
        opts.pop("vocab"),
        opts.pop("out"),
        progress=flags.FLAGS.progress,
        **opts,
    )


def cli_main(main_fn) -> None:
    """Run an absl ``main`` turning ValueError/OSError into one line on stderr and exit 1."""
    from absl import app

    def wrapped(argv):
        try:
            main_fn(argv)
        except (ValueError, OSError) as e:
            cli.fail(first_line(e))

    app.run(wrapped)


def run() -> None:
    """Console-script entry point (``repeat-scaling-prepare``)."""
    _define_flags()
    cli_main(_main)


if __name__ == "__main__":
    run()
