"""Prepare a downstream task's "pairs" token store: ``python -m repeat_scaling.prepare --task=...``.

Every example becomes one fixed-size document (inputs + EOS, targets + EOS, each
truncated or padded to its length; layout in :mod:`repeat_scaling.data.downstream`);
the texts go to ``<split>.references.jsonl``. Idempotence, fingerprints and the atomic
write are :mod:`repeat_scaling.prepare`'s, as for text stores.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from repeat_scaling.data import store as store_lib
from repeat_scaling.data.vocab import EOS_ID, Encoder, VocabInfo, load_vocab_info
from repeat_scaling.prepare import (
    DEFAULT_CHUNK_DOCS,
    PREPARE_VERSION,
    existing_store,
    request_fingerprint,
)


def encode_pairs(
    encoder: Encoder, examples: list, inputs_length: int, targets_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text pairs -> ``(rows [n, inputs_length + targets_length + 1], in_cut [n], tg_cut [n])``.

    Each row is the inputs + EOS, then the targets + EOS, each truncated (EOS kept last)
    or 0-padded to its length, then the store's document EOS; ``*_cut`` flag the rows whose
    inputs / targets were truncated. See :mod:`repeat_scaling.data.downstream`.
    """
    n, width = len(examples), inputs_length + targets_length + 1
    rows = np.zeros((n, width), dtype=encoder.info.token_dtype)
    cuts = np.zeros((2, n), dtype=bool)
    parts = (
        encoder.encode_batch([e.inputs for e in examples]),
        encoder.encode_batch([e.targets for e in examples]),
    )
    for part, (ids_list, start, length) in enumerate(
        zip(parts, (0, inputs_length), (inputs_length, targets_length))
    ):
        for r, ids in enumerate(ids_list):
            k = min(len(ids), length - 1)
            cuts[part, r] = k < len(ids)
            rows[r, start : start + k] = ids[:k]
            rows[r, start + k] = EOS_ID
    rows[:, -1] = EOS_ID
    return rows, cuts[0], cuts[1]


def prepare_task_store(
    task_spec: str,
    vocab_spec: str | VocabInfo,
    out_dir: str | os.PathLike,
    *,
    inputs_length: int,
    targets_length: int,
    tfds_data_dir: str | None = None,
    max_examples: int | None = None,
    validation_docs: int | None = None,
    overwrite: bool = False,
    log=None,
) -> store_lib.TokenStore:
    """Prepare (or reuse) the "pairs" token store of a downstream task at ``out_dir``.

    Every example becomes one document of ``inputs_length + targets_length`` tokens (layout
    in :mod:`repeat_scaling.data.downstream`), in the task's order, so example ``c`` of a
    split is chunk ``c`` of ``raw_length = inputs_length + targets_length + 1``. The texts
    go to ``<split>.references.jsonl``; ``manifest["pairs"]`` records the task, the
    lengths, the example counts and how many inputs / targets were truncated per split.

    Args:
      task_spec: see :func:`repeat_scaling.data.downstream.parse_task`.
      inputs_length / targets_length: token budget of each part, its EOS included (>= 2).
      tfds_data_dir: TFDS data_dir of TFDS tasks (local or gs://).
      max_examples: cap on examples per split (the first ones in task order).
      validation_docs: carve-out size for ``pairs_jsonl`` tasks without a validation file.
      overwrite / log: as for :func:`prepare_store`.

    Raises:
      ValueError subclasses with one-line messages (unknown task, lengths too small, a
      task split with no examples, a vocabulary without text form).
    """
    from repeat_scaling.data import downstream

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = os.path.abspath(os.fspath(out_dir))
    for name, v in (("inputs_length", inputs_length), ("targets_length", targets_length)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 2:
            raise ValueError(f"{name}={v!r} must be an integer >= 2 (its EOS included)")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be >= 1 (or unset)")
    vocab = load_vocab_info(vocab_spec)
    if vocab.kind == "tokens":
        raise ValueError(f"vocab {vocab.spec!r} has no text form; a task needs byte or a .model")
    task = downstream.parse_task(
        task_spec, tfds_data_dir=tfds_data_dir, validation_docs=validation_docs
    )
    options = {
        "layout": "pairs",
        "inputs_length": int(inputs_length),
        "targets_length": int(targets_length),
        "max_examples": max_examples,
        "validation_docs": validation_docs,
    }
    fingerprint = request_fingerprint(task.fingerprint(), vocab, options)
    existing, overwrite = existing_store(out_dir, fingerprint, overwrite, log)
    if existing is not None:
        return existing

    t0 = time.time()
    encoder = Encoder(vocab)
    writer = store_lib.StoreWriter(out_dir, vocab)
    counts: dict[str, dict[str, int]] = {}
    try:
        for split in downstream.SPLITS:
            c = counts[split] = {"examples": 0, "truncated_inputs": 0, "truncated_targets": 0}
            sw = writer.split_writer(split)
            refs_path = downstream.references_path(writer.tmp_dir, split)
            with open(refs_path, "w", encoding="utf-8") as refs:
                block: list = []
                for ex in task.examples(split):
                    block.append(ex)
                    full = max_examples is not None and c["examples"] + len(block) >= max_examples
                    if len(block) == DEFAULT_CHUNK_DOCS or full:
                        _write_pairs(encoder, block, inputs_length, targets_length, sw, refs, c)
                        block = []
                    if full:
                        break
                _write_pairs(encoder, block, inputs_length, targets_length, sw, refs, c)
            if not c["examples"]:
                raise downstream.TaskError(f"task {task_spec!r} yielded no {split} examples")
        elapsed = time.time() - t0
        manifest = {
            "request_fingerprint": fingerprint,
            "prepare_version": PREPARE_VERSION,
            "source": {
                "spec": task_spec,
                "kind": f"task:{task.kind}",
                "fingerprint": task.fingerprint(),
                "stats": task.stats,
            },
            "options": options,
            "pairs": {
                "task": task_spec,
                "inputs_length": int(inputs_length),
                "targets_length": int(targets_length),
                "raw_length": int(inputs_length) + int(targets_length) + 1,
                "examples": {s: v["examples"] for s, v in counts.items()},
                "truncated_inputs": {s: v["truncated_inputs"] for s, v in counts.items()},
                "truncated_targets": {s: v["truncated_targets"] for s, v in counts.items()},
                "references": {
                    s: os.path.basename(downstream.references_path("", s)) for s in counts
                },
            },
            "elapsed_s": round(elapsed, 3),
        }
        store = writer.commit(manifest, overwrite=overwrite)
    except BaseException:
        writer.abort()
        raise
    for split, c in counts.items():
        log(
            f"prepare: task {task_spec} {split}: {c['examples']} examples "
            f"({c['truncated_inputs']} inputs and {c['truncated_targets']} targets truncated)"
        )
    log(f"prepare: wrote {out_dir} in {elapsed:.1f}s")
    return store


def _write_pairs(encoder, block, inputs_length, targets_length, split_writer, refs, counts):
    """Encode one block of examples, append them to the split and to its references."""
    if not block:
        return
    rows, in_cut, tg_cut = encode_pairs(encoder, block, inputs_length, targets_length)
    split_writer.write(rows.ravel(), np.full(len(rows), rows.shape[1], np.int64))
    for ex in block:
        ref = {
            "index": counts["examples"],
            "inputs": ex.inputs,
            "targets": ex.targets,
            "answers": list(ex.answers),
        }
        refs.write(json.dumps(ref, ensure_ascii=False) + "\n")
        counts["examples"] += 1
    counts["truncated_inputs"] += int(in_cut.sum())
    counts["truncated_targets"] += int(tg_cut.sum())
