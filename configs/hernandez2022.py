"""Hernandez et al. 2022, "Scaling Laws and Interpretability of Learning from Repeated Data".

Decoder-only models trained with the causal LM objective on a FIXED total token budget,
a fraction f of which comes from a small subset repeated E times (subset = f*T/E
tokens; the rest is seen once). The sweep crosses model size x f x E; the f = 0 runs
are the unique baselines the report fits L(N) on (model-size multipliers).

    python launch/submit.py --config=configs/hernandez2022.py:demo --root=demo_out/hernandez

Scales (`:arg`):
- `demo`: `dec_tiny` on the built-in corpus (byte vocabulary), 300 steps of 16 x 128
  tokens; f in {0, 10, 50}% x E in {10, 100}: 5 runs, minutes each on a 2-core CPU.
- `cpu`: Hernandez (a)+(b) on a 2-core CPU, on the C4 sample in ../shared/data (byte
  vocabulary; point `data.source`/`data.store` at your own C4 to use it): 1000 steps of
  32 x 128 tokens (T = 4.1M, 31 tokens per parameter for `dec_tiny`); `dec_tiny` at
  f in {50, 10}% x E in {2, 8, 32, 128, 512, 2048} with second seeds at three E each,
  the f = 0 baseline (2 seeds) and the unique-data controls (f = 0 on (1 - f) T tokens:
  500 and 900 steps); `dec_micro` on the same grid; f = 0 baselines of `dec_micro`,
  `dec_tiny`, `dec_mini` for the L(N) fit (effective model size): 36 runs. Measured: 89
  min on 2 cores beside other jobs (about 55 min alone); double descent at f = 50% for
  both sizes (dec_tiny peak E = 512: 2.30 vs 1.90 unique, 2.05 for the unique-data
  control), memorisation onset next to the peak, N_eff/N 0.135 at the peak; no peak
  beyond the noise at f = 10% (docs/reproducing.md).
- `small`: `d1m`, `d3m`, `d10m` on C4 (T5 SentencePiece vocabulary), 10k steps of
  64 x 512 tokens (328M tokens); f in {0, 10, 50}% x E in {10, 100, 1000}: 21 runs,
  hours each on one GPU.
- `paper`: `d1m` ... `d800m` (1.57M-805M parameters), T = 100B tokens (190,735 steps of
  512 x 1024 tokens); main runs f = 10% with E from 3 to 10^4 (half decades), scans at
  f in {3, 20, 50, 90}%; 287 runs. Optimiser settings are unconfirmed (the paper does
  not list them): AdamW, peak lr 2e-4 (1e-3 below 100M parameters), 1% warmup, cosine.

Fine-tuning stages (`:finetune_demo`, `:finetune_small`, `:finetune_paper`): the same
models fine-tuned on Python code (the built-in `pystdlib` corpus: the standard library's
own source, no download) with the causal LM objective, each started from a pre-training
run of the same scale (`init_from="{root}/<pre-training run name>"`, resolved by
`repeat_scaling/sweeps.py` to the same `--root`), plus one from-scratch run per model on the same
code. Run the pre-training stage first, then:

    python launch/submit.py --config=configs/hernandez2022.py:finetune_demo --root=demo_out/hernandez

- `finetune_demo`: every demo run fine-tuned (5) + 1 from scratch; 200 steps of 16 x 128
  byte tokens (410k tokens) on `pystdlib` (12.6 MB of code).
- `finetune_small`: every small run (21) + 3 from scratch; 1,000 steps of 16 x 512 on
  `pystdlib:tests=1` (the library and its test suites), T5 SentencePiece vocabulary.
- `finetune_paper`: the f = 0 and f = 10% runs of every size (63) + 7 from scratch; 1,000
  steps of 8 x 1024. Hernandez et al. fine-tune on a large Python corpus: for their scale
  replace `data.source` by one (e.g. `json:PATH/*.jsonl.gz`) and raise `train.steps`.
Fine-tuning optimiser (this suite's choice, unconfirmed): AdamW, peak lr 1e-3 (demo),
3e-4 (1e-4 for d300m and d800m), 5% warmup, cosine.
"""

from repeat_scaling import sweeps
from repeat_scaling.train.config import adamw, default_config, model_fields

SCALES = ("demo", "small", "paper")
CAMPAIGNS = ("cpu",)  # a CPU campaign (no fine-tuning stage)
STAGES = tuple(f"finetune_{s}" for s in SCALES)
PYTHON_SOURCE = {"demo": "pystdlib", "small": "pystdlib:tests=1", "paper": "pystdlib:tests=1"}
C4 = "tfds:c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def _grid(models, fractions, epochs, seeds=(0,)):
    """f = 0 baselines (E = 1) plus every (model, f > 0, E) combination."""
    sweep = []
    for seed in seeds:
        for m in models:
            sweep.append({"model.name": m, "data.repeated_fraction": 0.0,
                          "data.repeated_epochs": 1, "seed": seed})  # fmt: skip
            for f in fractions:
                for e in epochs:
                    sweep.append({"model.name": m, "data.repeated_fraction": f,
                                  "data.repeated_epochs": e, "seed": seed})  # fmt: skip
    return sweep


def finetune_config(scale: str):
    """The fine-tuning stage of ``scale``: see the module docstring."""
    c = get_config(scale)
    sources = sweeps.expand(c, sweeps.ROOT_TEMPLATE)
    if scale == "paper":  # the main runs (f = 10%) and the baselines
        sources = [r for r in sources if r.config.data.repeated_fraction in (0.0, 0.1)]
    c.data.source = PYTHON_SOURCE[scale]
    c.data.store = {
        "demo": "demo_out/stores/pystdlib-byte",
        "small": "data/stores/pystdlib-tests-t5spm",
        "paper": "data/stores/pystdlib-tests-t5spm",
    }[scale]
    c.data.repeated_fraction, c.data.repeated_epochs = 0.0, 1
    steps, batch, length = {"demo": (200, 16, 128), "small": (1000, 16, 512),
                            "paper": (1000, 8, 1024)}[scale]  # fmt: skip
    c.train.steps, c.train.batch_size, c.data.length = steps, batch, length
    c.train.checkpoint_every = steps // 4
    c.train.keep, c.train.keep_period = 4, 0
    wd = c.train.optimizer.weight_decay
    adamw(c, lr=1e-3 if scale == "demo" else 3e-4, warmup=steps // 20, schedule="cosine", wd=wd)

    def entry(run, **extra):
        e = {"model.name": run.config.model.name, "data.source": c.data.source, "seed": 0}
        if "train.optimizer.learning_rate" in run.overrides:  # d300m, d800m
            e["train.optimizer.learning_rate"] = 1e-4
        return {**e, **extra}

    c.sweep = sweeps.finetune_sweep(sources, entry)
    return c


C4_SAMPLE = "json:../shared/data/c4-en-sample/*.json.gz"
#: The CPU campaign: (model, repeated fraction) -> the E given a second seed (around the
#: peak the first seeds located).
CPU_EPOCHS = (2, 8, 32, 128, 512, 2048)
CPU_SECOND_SEED = {("dec_tiny", 0.5): (32, 128, 512), ("dec_tiny", 0.1): (8, 32, 128)}


def cpu_config(c):
    """Hernandez (a)+(b) on a 2-core CPU: see the module docstring (`cpu`)."""
    c.model = model_fields("dec_tiny")
    c.data.source, c.data.vocab = C4_SAMPLE, "byte"
    c.data.store = "demo_out/stores/c4-sample-byte"
    c.data.length = 128
    c.train.steps, c.train.batch_size = 1000, 32  # T = 4.1M tokens
    c.train.log_every = 50
    c.train.checkpoint_every, c.train.keep, c.train.keep_period = 250, 4, 0
    adamw(c, lr=3e-3, warmup=20, schedule="cosine")
    c.train.optimizer.end_learning_rate_fraction = 0.1
    c.eval.update(dict(test_batches=64, memorisation_examples=64))
    sweep = []
    for m in ("dec_tiny", "dec_micro"):
        for seed in (0, 1) if m == "dec_tiny" else (0,):
            sweep.append(_entry(m, 0.0, 1, seed))
        for f in (0.5, 0.1):
            sweep += [_entry(m, f, e, 0) for e in CPU_EPOCHS]
            sweep += [_entry(m, f, e, 1) for e in CPU_SECOND_SEED.get((m, f), ())]
            # The unique-data control: the (1 - f) T unique tokens alone, f = 0.
            if m == "dec_tiny":
                control = _entry(m, 0.0, 1, 0)
                control["train.steps"] = round(c.train.steps * (1 - f))
                sweep.append(control)
    sweep.append(_entry("dec_mini", 0.0, 1, 0))  # the third size of the L(N) fit
    c.sweep = sweep
    return c


def _entry(model, f, e, seed):
    return {"model.name": model, "data.repeated_fraction": f, "data.repeated_epochs": e,
            "seed": seed}  # fmt: skip


def get_config(arg: str = "demo"):
    if arg in STAGES:
        return finetune_config(arg.removeprefix("finetune_"))
    if arg not in SCALES + CAMPAIGNS:
        raise ValueError(
            f"configs/hernandez2022.py:{arg}; expected one of {SCALES + CAMPAIGNS + STAGES}"
        )
    c = default_config()
    c.data.objective = "causal_lm"
    c.train.log_every = 10 if arg == "demo" else 100
    if arg == "cpu":
        return cpu_config(c)
    if arg == "demo":
        c.model = model_fields("dec_tiny")
        c.data.source, c.data.vocab = "builtin", "byte"
        c.data.store = "demo_out/stores/builtin-byte"
        c.data.length = 128
        c.train.steps, c.train.batch_size = 300, 16
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 50, 2, 50
        adamw(c, lr=3e-3, warmup=20, schedule="cosine")
        c.sweep = _grid(["dec_tiny"], [0.1, 0.5], [10, 100])
    elif arg == "small":
        c.model = model_fields("d1m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"
        c.data.length = 512
        c.train.steps, c.train.batch_size = 10_000, 64
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 500, 2, 1000
        adamw(c, lr=1e-3, warmup=200, schedule="cosine")
        c.sweep = _grid(["d1m", "d3m", "d10m"], [0.1, 0.5], [10, 100, 1000])
    else:
        c.model = model_fields("d25m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.data.length = 1024
        c.train.batch_size = 512
        c.train.steps = round(100e9 / (512 * 1024))  # T = 100B tokens
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 2000, 2, 10_000
        c.train.compute_dtype = "bfloat16"
        # Without rematerialisation d800m's step needs 82.8 GiB per chip on a v4-128 (the
        # saved attention probabilities alone are ~19 GiB): recompute the batched
        # (attention) dots in the backward pass. Every size inherits it (a base-config model
        # field), so run names are unchanged. docs/launching.md: "Before you pay for a pod".
        c.model.remat_policy = "dots_no_batch"
        adamw(c, lr=1e-3, warmup=c.train.steps // 100, schedule="cosine", wd=0.1)
        c.train.optimizer.clip_norm = 1.0
        models = ["d1m", "d3m", "d10m", "d25m", "d85m", "d300m", "d800m"]
        epochs = [3, 10, 30, 100, 300, 1000, 3000, 10_000]
        main = _grid(models, [0.1], epochs)
        scans = [e for e in _grid(models, [0.03, 0.2, 0.5, 0.9], epochs) if e["data.repeated_fraction"]]  # fmt: skip
        c.sweep = main + scans
        for entry in c.sweep:
            if entry["model.name"] in ("d300m", "d800m"):
                entry["train.optimizer.learning_rate"] = 2e-4
    return c
