"""Evaluator throughput next to the trainer's, on the demo models.

    python -m repeat_scaling.bench eval [--configs=dec,t5] [--steps=40] [--out=DIR]

For each demo config (``configs/demo.py:dec`` / ``:t5``, byte vocabulary, built-in corpus
store prepared under ``--out``) this trains ``--steps`` steps with the real trainer
(checkpoints at half-way and at the end), then runs the real evaluator over both
checkpoints, and prints one JSON object per config:

- ``train_tokens_per_s``: median of the trainer's logged ``tokens_per_s`` (processed
  tokens: encoder + decoder for T5), first log line (compilation) excluded;
- ``eval_forward_tokens_per_s``: the evaluator's jitted loss pass (forward + per-token
  loss) over the held-out batches, compiled, same token unit;
- ``eval_pass_tokens_per_s`` / ``eval_pass_s``: one whole evaluation of the second
  checkpoint (restore + every metric and probe), tokens fed to the model per second;
- ratios of the evaluator's forward throughput to the trainer's (a forward is about a
  third of a training step's FLOPs, so ~3x is the ideal).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

from repeat_scaling import cli, config_files, run_files

REPO = pathlib.Path(__file__).resolve().parents[2]


def _demo_config(arg: str, store: pathlib.Path, steps: int):
    c = config_files.load(f"{REPO}/configs/demo.py:{arg}")
    c.data.store = str(store)
    c.train.steps = steps
    c.train.checkpoint_every = max(1, steps // 2)
    c.train.keep = 2
    c.train.log_every = max(1, steps // 8)
    c.train.progress_bar = "off"
    return c


def bench_one(arg: str, out: pathlib.Path, steps: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from repeat_scaling.eval import evaluator
    from repeat_scaling.eval.settings import EvalSettings
    from repeat_scaling.train import loop

    store = out / "stores" / "builtin-byte"
    workdir = out / f"run_{arg}"
    config = _demo_config(arg, store, steps)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    loop.train(config, workdir)
    logs, _ = run_files.read_jsonl(workdir / run_files.METRICS)
    train_tps = [r["tokens_per_s"] for r in logs[1:] if r.get("tokens_per_s")]

    ev = evaluator.Evaluator(workdir, EvalSettings(), evaluator.eval_mesh(0))
    recs = ev.run_all()
    last = recs[-1]
    runner = ev._runner  # the evaluator's compiled model runner (after both checkpoints)
    batches = ev.data()["test_batches"]
    runner.loss(batches[0])  # compiled already; make sure
    tokens = sum(
        int(np.asarray(b[k]).size)
        for b in batches
        for k in ("encoder_input_tokens", "decoder_input_tokens")
        if k in b
    )
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            runner.loss(b)
    fwd_s = time.perf_counter() - t0
    fwd_tps = tokens * repeats / fwd_s
    train_med = statistics.median(train_tps) if train_tps else None
    return {
        "bench": "eval",
        "config": f"configs/demo.py:{arg}",
        "model": ev.run.model_cfg.name,
        "arch": ev.run.model_cfg.arch,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": int(ev.mesh.devices.size),
        "train_batch_size": int(config.train.batch_size),
        "eval_batch_size": ev.settings.batch_size,
        "train_tokens_per_s": train_med,
        "eval_forward_tokens_per_s": fwd_tps,
        "eval_forward_vs_train": (fwd_tps / train_med) if train_med else None,
        "eval_pass_s": last["eval_time_s"],
        "eval_pass_tokens": last["eval_tokens"],
        "eval_pass_tokens_per_s": last["eval_tokens"] / last["eval_time_s"],
        "first_pass_s_incl_compile": recs[0]["eval_time_s"],
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m repeat_scaling.bench eval")
    p.add_argument("--configs", default="dec,t5", help="demo config args, comma separated")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the test batches")
    p.add_argument("--out", default="", help="work directory (default: a temporary one)")
    args = p.parse_args(argv[1:])
    if args.steps < 2:
        cli.fail(f"--steps={args.steps}; expected >= 2 (two checkpoints)")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.out or tmp).absolute()
        for arg in [a for a in args.configs.split(",") if a]:
            print(json.dumps(bench_one(arg, out, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main(sys.argv)
