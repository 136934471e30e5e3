"""Input-pipeline throughput: examples/s and tokens/s of the Batcher per objective, one core.

    python -m repeat_scaling.bench pipeline [--store DIR] [--batch 128] [--seconds 3]

Prints one JSON object per objective configuration. ``tokens_per_s`` counts store tokens
consumed (raw chunk tokens: the data rate), ``positions_per_s`` the model positions produced
(rows x ``objective.tokens_per_example``), ``non_pad_fraction`` the share of those
positions holding real tokens (packing efficiency). The process is pinned to one CPU core. The store
is the built-in corpus with the byte vocabulary, prepared into a temporary directory unless
``--store`` names an existing token store.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import numpy as np

CONFIGS = [
    ("span_corruption", "encoder_decoder", {"inputs_length": 512}),
    ("span_corruption", "encoder_decoder", {"inputs_length": 512, "pack": True}),
    ("ul2", "encoder_decoder", {"inputs_length": 512, "targets_length": 512}),
    ("ul2", "decoder_only", {"length": 512}),
    ("causal_lm", "decoder_only", {"length": 512}),
    ("causal_lm", "decoder_only", {"length": 512, "pack": True}),
    ("prefix_lm", "decoder_only", {"length": 512}),
    ("prefix_lm", "encoder_decoder", {"inputs_length": 512, "targets_length": 512}),
]


def _pin_one_core() -> int | None:
    if hasattr(os, "sched_setaffinity"):
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return cpu
    return None


def _measure(split, vocab, name, arch, options, batch, seconds):
    from repeat_scaling.data import pipeline

    obj = pipeline.make_objective(name, vocab, arch, **options)
    num_chunks = split.num_tokens // obj.raw_length
    steps = max(8, int(200_000 * 568 / obj.raw_length) // batch)  # enough to never run out
    slots = steps * batch
    epochs = max(2, math.ceil(slots / (0.5 * num_chunks)))
    plan = pipeline.build_plan(split, obj, steps, batch, 1.0, epochs, seed=0)
    batcher = pipeline.Batcher(split, plan, obj, batch, seed=0)
    batcher.batch(0)  # warm up (page in the store)
    n, t0 = 0, time.perf_counter()
    eff = []
    while True:
        f = batcher.batch(1 + n % (steps - 1))
        n += 1
        real = [f["decoder_target_tokens"]]
        if "encoder_input_tokens" in f:
            real.append(f["encoder_input_tokens"])
        eff.append(sum(np.count_nonzero(x) for x in real) / sum(x.size for x in real))
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            break
    rows = n * batch
    return {
        "bench": "pipeline",
        "objective": name,
        "arch": arch,
        "options": options,
        "batch": batch,
        "raw_length": obj.raw_length,
        "feature_lengths": sorted(set(obj.feature_lengths.values())),
        "examples_per_s": round(rows / dt, 1),
        "tokens_per_s": round(rows * obj.raw_length / dt),
        "positions_per_s": round(rows * obj.tokens_per_example / dt),
        "non_pad_fraction": round(float(np.mean(eff)), 4),
        "batches": n,
        "seconds": round(dt, 3),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m repeat_scaling.bench pipeline")
    parser.add_argument("--store", default=None, help="existing token store (default: builtin)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", default=None, help="comma-separated objective names")
    args = parser.parse_args(argv[1:])
    cpu = _pin_one_core()
    from repeat_scaling.data.store import TokenStore
    from repeat_scaling.prepare import prepare_store

    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            store = TokenStore(args.store)
        else:
            store = prepare_store("builtin", "byte", tmp, progress=False, log=lambda *a: None)
        split = store.split("train")
        only = set(args.only.split(",")) if args.only else None
        for name, arch, options in CONFIGS:
            if only and name not in only:
                continue
            result = _measure(split, store.vocab, name, arch, options, args.batch, args.seconds)
            result.update(
                cpu=cpu,
                host=platform.node(),
                store=args.store or "builtin/byte",
                train_tokens=int(split.num_tokens),
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv)
