"""Data benchmarks: prepare throughput vs. the bare tokenizer, and store read throughput.

    python -m repeat_scaling.bench data [--corpus=GLOB] [--sp_vocab_size=8000] [--reads=N]

Prints one JSON object per measurement on stdout:

- ``data.prepare``: a whole ``prepare_store`` run (read + tokenize + shuffle + write) on the
  C4 sample, with the byte vocabulary and with a SentencePiece vocabulary trained by
  ``train_vocab`` on the same sample; MB of text/s and tokens/s, in total and per worker.
- ``data.sentencepiece_encode``: ``SentencePieceProcessor.encode`` called on each document
  in a tight loop (one thread), the tokenizer's own speed on the same text.
- ``data.tokenizer_overhead``: tight-loop tokens/s divided by prepare tokens/s per worker
  (target <= 1.5: preparation is limited by the tokenizer).
- ``data.read``: random ``tokens(start, length)`` reads from a store (``view``: the call
  alone; ``copy``: copying each read into a ``[batch, length]`` int32 batch, as a data
  loader does), tokens/s (target >= 1e8).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from repeat_scaling.data.sources import parse_source
from repeat_scaling.data.store import StoreWriter
from repeat_scaling.data.vocab import load_vocab_info
from repeat_scaling.prepare import prepare_store
from repeat_scaling.train_vocab import train_vocab


def _default_corpus() -> str | None:
    root = os.environ.get(
        "REPEAT_SCALING_SHARED_DATA",
        os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"),
    )
    path = os.path.join(os.path.abspath(root), "c4-en-sample")
    return os.path.join(path, "c4-*.sample-*.json.gz") if os.path.isdir(path) else None


def _scaled_corpus(corpus: str | None, scale: int, tmp: str) -> str:
    """A source spec: the corpus glob itself, or its files copied ``scale`` times."""
    if not corpus:
        return "builtin"
    if scale <= 1:
        return f"json:{corpus}"
    import glob
    import shutil

    for path in sorted(glob.glob(corpus)):
        for k in range(scale):
            shutil.copy(path, os.path.join(tmp, f"copy{k}-{os.path.basename(path)}"))
    return f"json:{tmp}/copy*"


def _emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def _bench_prepare(source: str, vocab: str, workers: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"store-{os.path.basename(vocab)}-{workers}")
    t0 = time.perf_counter()
    store = prepare_store(
        source, vocab, out, num_workers=workers, progress=False, log=lambda m: None
    )
    dt = time.perf_counter() - t0
    chars = sum(store.manifest["split_text_chars"].values())
    tokens = sum(store.split(s).num_tokens for s in store.split_names)
    docs = sum(store.split(s).num_documents for s in store.split_names)
    return {
        "benchmark": "data.prepare",
        "vocab": store.vocab.kind,
        "vocab_size": store.vocab.vocab_size,
        "num_workers": workers,
        "documents": docs,
        "text_mb": round(chars / 1e6, 3),
        "tokens": tokens,
        "seconds": round(dt, 3),
        "mb_text_per_s": round(chars / 1e6 / dt, 3),
        "tokens_per_s": round(tokens / dt),
        "tokens_per_s_per_worker": round(tokens / dt / workers),
    }


def _bench_sp_tight_loop(source: str, model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    src = parse_source(source)
    texts = [t for split in ("train", "validation") for _, t in src.documents(split)]
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        tokens = 0
        for t in texts:
            tokens += len(sp.encode(t))
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    chars = sum(map(len, texts))
    return {
        "benchmark": "data.sentencepiece_encode",
        "documents": len(texts),
        "tokens": tokens + len(texts),  # + EOS, as stored
        "seconds": round(best, 3),
        "mb_text_per_s": round(chars / 1e6 / best, 3),
        "tokens_per_s": round((tokens + len(texts)) / best),
    }


def _bench_reads(split, length: int, reads: int, batch: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, split.num_tokens - length, size=reads).tolist()
    tokens = split.tokens
    for s in starts[:1000]:  # warm the page cache / mapping
        tokens(s, length)
    t0 = time.perf_counter()
    for s in starts:
        tokens(s, length)
    view_dt = time.perf_counter() - t0
    buf = np.empty((batch, length), np.int32)
    t0 = time.perf_counter()
    for i, s in enumerate(starts):
        buf[i % batch] = tokens(s, length)
    copy_dt = time.perf_counter() - t0
    common = {
        "benchmark": "data.read",
        "store_tokens": split.num_tokens,
        "shards": len(split.shards),
        "read_length": length,
        "reads": reads,
        "target_tokens_per_s": 1e8,
    }
    return [
        {**common, "mode": "view", "tokens_per_s": round(reads * length / view_dt),
         "us_per_read": round(view_dt / reads * 1e6, 3)},
        {**common, "mode": "copy_to_int32_batch", "batch": batch,
         "tokens_per_s": round(reads * length / copy_dt),
         "us_per_read": round(copy_dt / reads * 1e6, 3)},
    ]  # fmt: skip


def _large_store(tmp: str, num_tokens: int, shard_tokens: int):
    """A store of random byte-vocab tokens in several shards (read benchmarks only)."""
    w = StoreWriter(os.path.join(tmp, "large"), load_vocab_info("byte"), shard_tokens=shard_tokens)
    sw = w.split_writer("train")
    rng = np.random.default_rng(0)
    doc = 1 << 20
    for _ in range(num_tokens // doc):
        d = rng.integers(3, 259, size=doc, dtype=np.uint16)
        d[-1] = 1
        sw.write(d)
    return w.commit({"source": {"spec": "random tokens (benchmark)"}}).split("train")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m repeat_scaling.bench data")
    p.add_argument("--corpus", default=None, help="json glob (default: the shared C4 sample)")
    p.add_argument("--sp_vocab_size", type=int, default=8000)
    p.add_argument(
        "--scale", type=int, default=3, help="repeat the corpus N times (amortizes start-up)"
    )
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reads", type=int, default=200_000)
    p.add_argument("--read_lengths", type=int, nargs="+", default=[568, 4096])
    p.add_argument("--large_store_tokens", type=int, default=64 << 20)
    args = p.parse_args(argv[1:])
    corpus = args.corpus or _default_corpus()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        source = _scaled_corpus(corpus, args.scale, tmp)
        byte = _bench_prepare(source, "byte", 1, tmp)
        _emit({**byte, "source": source})
        model = os.path.join(tmp, "sp.model")
        t0 = time.perf_counter()
        # Trained on the corpus once (not its copies): the vocabulary, not the data, matters.
        train_vocab(f"json:{corpus}" if corpus else source, args.sp_vocab_size, model)
        _emit({"benchmark": "data.train_vocab", "vocab_size": args.sp_vocab_size,
               "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
        tight = _bench_sp_tight_loop(source, model)
        _emit(tight)
        for workers in args.workers:
            rec = _bench_prepare(source, model, workers, tmp)
            _emit(rec)
            _emit({
                "benchmark": "data.tokenizer_overhead",
                "num_workers": workers,
                "ratio_tight_loop_to_prepare_per_worker": round(
                    tight["tokens_per_s"] / rec["tokens_per_s_per_worker"], 3),
                "target_max": 1.5,
                "cpus": os.cpu_count(),
            })  # fmt: skip
        from repeat_scaling.data.store import TokenStore

        c4 = TokenStore(os.path.join(tmp, "store-byte-1")).split("train")
        large = _large_store(tmp, args.large_store_tokens, shard_tokens=16 << 20)
        for split in (c4, large):
            for length in args.read_lengths:
                for rec in _bench_reads(split, length, args.reads, batch=128):
                    _emit(rec)
