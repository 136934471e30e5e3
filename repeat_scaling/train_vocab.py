r"""Train a T5-style SentencePiece vocabulary on any source, offline.

    python -m repeat_scaling.train_vocab --source=SPEC --vocab_size=N --out=FILE.model

The model is a unigram SentencePiece model with T5's special ids (pad=0, eos=1, unk=2, no
bos). ``--vocab_size`` counts the model's own pieces; used through seqio /
:mod:`repeat_scaling.data.vocab` it gains T5's 100 extra ids (sentinels) at the end, so the
id space has ``N + 100`` ids. Training reads the ``train`` split of the source (validation
documents never enter the vocabulary), one SentencePiece sentence per non-empty line, at
most ``--max_sentences`` lines (sampled by SentencePiece).

The model file is written to a temporary name and renamed, so an interrupted run leaves no
half-written ``.model``.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator

from repeat_scaling.data import sources as sources_lib
from repeat_scaling.data.vocab import VocabInfo, load_vocab_info

MAX_SENTENCE_BYTES = 1 << 14


class VocabTrainingError(ValueError):
    """Vocabulary training failed (one-line message)."""


def _lines(source: sources_lib.Source, counter: dict) -> Iterator[str]:
    for _, text in source.documents("train"):
        counter["docs"] += 1
        for line in text.splitlines():
            line = line.strip()
            if line:
                counter["lines"] += 1
                yield line


def train_vocab(
    source_spec: str,
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    max_sentences: int = 1_000_000,
    max_docs: int | None = None,
    text_field: str = "text",
    text_separator: str = "blank",
    tfds_data_dir: str | None = None,
    validation_docs: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
) -> VocabInfo:
    """Train the model and return its :class:`VocabInfo` (vocab_size = pieces + 100)."""
    import sentencepiece as spm

    if vocab_size < 8:
        raise VocabTrainingError(f"vocab_size={vocab_size} is too small; expected >= 8")
    if model_type not in ("unigram", "bpe"):
        raise VocabTrainingError(f"model_type={model_type!r}; expected 'unigram' or 'bpe'")
    out_path = os.path.abspath(os.fspath(out_path))
    if not out_path.endswith(".model"):
        raise VocabTrainingError(f"--out={out_path!r} must end with .model")
    source = sources_lib.parse_source(
        source_spec,
        text_field=text_field,
        tfds_data_dir=tfds_data_dir,
        text_separator=text_separator,
        validation_docs=validation_docs,
        max_docs=max_docs,
    )
    counter = {"docs": 0, "lines": 0}
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # sentence sampling is seeded, hence reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(source, counter),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        msg = msg.rpartition("] ")[2] or msg  # drop SentencePiece's source location prefix
        raise VocabTrainingError(
            f"SentencePiece training on {source_spec!r} ({counter['docs']} documents, "
            f"{counter['lines']} lines) failed: {msg}"
        ) from None
    if counter["lines"] == 0:
        raise VocabTrainingError(f"source {source_spec!r} yielded no training text")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)
    return load_vocab_info(out_path)


# -- command line ----------------------------------------------------------------------------

_FLAG_NAMES = (
    "source", "vocab_size", "out", "model_type", "character_coverage", "max_sentences",
    "max_docs", "text_field", "text_separator", "tfds_data_dir", "validation_docs", "seed",
)  # fmt: skip


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if "vocab_size" in flags.FLAGS:
        return
    flags.DEFINE_string("source", None, "source spec, as for prepare (train split is used)")
    flags.DEFINE_integer("vocab_size", None, "SentencePiece pieces (seqio adds 100 extra ids)")
    flags.DEFINE_string("out", None, "output FILE.model")
    flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type")
    flags.DEFINE_float("character_coverage", 0.9999, "SentencePiece character coverage")
    flags.DEFINE_integer("max_sentences", 1_000_000, "lines sampled for training")
    flags.DEFINE_integer("max_docs", None, "cap on documents read")
    flags.DEFINE_string("text_field", "text", "JSON / TFDS feature holding the text")
    flags.DEFINE_string("text_separator", "blank", "text sources: 'blank', 'file' or a marker")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources")
    flags.DEFINE_integer("validation_docs", None, "validation carve-out (kept out of training)")
    flags.DEFINE_integer("seed", 0, "SentencePiece random seed")
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file with the same fields"
    )


def _main(argv: list[str]) -> None:
    from absl import flags

    from repeat_scaling.prepare import resolve_options

    if len(argv) > 1:
        raise ValueError(f"unexpected positional arguments {argv[1:]}")
    opts = resolve_options(flags.FLAGS, _FLAG_NAMES)
    for required in ("source", "vocab_size", "out"):
        if not opts[required]:
            raise ValueError(f"--{required} is required (or set it in --config)")
    info = train_vocab(opts.pop("source"), opts.pop("vocab_size"), opts.pop("out"), **opts)
    print(
        f"train_vocab: wrote {info.path} ({info.vocab_size - info.extra_ids} pieces + "
        f"{info.extra_ids} extra ids, sha256 {info.sha256[:12]})",
        file=sys.stderr,
    )


def run() -> None:
    """Console-script entry point (``repeat-scaling-train-vocab``)."""
    from repeat_scaling.prepare import cli_main

    _define_flags()
    cli_main(_main)


if __name__ == "__main__":
    run()
