"""Hernandez et al. 2022, "Scaling Laws and Interpretability of Learning from Repeated Data".

Decoder-only causal LMs on a FIXED token budget T, a fraction f of which comes from a
subset of f*T/E tokens repeated E times; the sweep crosses model size x f x E, and the
f = 0 runs are the unique baselines the report fits L(N) on.

    python launch/submit.py --config=configs/hernandez2022.py:demo --root=demo_out/hernandez

Scales (`:arg`; budgets and grids in docs/launching.md, docs/reproducing.md):
- `demo`: `dec_tiny` on the built-in corpus, 300 steps of 16 x 128 bytes, f in
  {0, 10, 50}% x E in {10, 100}: 5 runs, minutes each on a 2-core CPU.
- `cpu`: Hernandez (a)+(b) on the C4 sample, `dec_tiny`/`dec_micro` at f in {10, 50}% x
  E in 2 ... 2048, unique-data controls, `dec_mini` baseline: 36 runs, with the CPU speed
  settings (`cpu_fused` attention, `scan_unroll=2`, `steps_per_call=4`; a C++ compiler is
  needed). Measured: 28.4 min alone on 2 cores with their evaluation; double descent at
  f = 50% for both sizes (dec_tiny peak E = 512: 2.30 vs 1.90 unique, 2.05 for the
  unique-data control), memorisation onset next to the peak, N_eff/N 0.132 at the peak;
  no peak beyond the noise at f = 10%.
- `small`: `d1m`-`d10m` on C4, 10k steps of 64 x 512: 21 runs, hours each on one GPU.
- `paper`: `d1m`-`d800m`, T = 100B tokens, f = 10% x E in 3 ... 10^4, scans at f in
  {3, 20, 50, 90}%: 287 runs (optimiser unconfirmed: AdamW, peak lr 2e-4 (1e-3 below
  100M parameters), 1% warmup, cosine).
- `finetune_demo` / `finetune_small` / `finetune_paper`: that scale's runs fine-tuned on
  Python code (`pystdlib`) from `{root}/<pre-training run>`, plus one from-scratch run
  per model: 5 + 1, 21 + 3, 63 + 7 runs (docs/finetuning.md). Run the pre-training
  stage first, then the same command with `:finetune_demo`.
"""

from repeat_scaling import sweeps
from repeat_scaling.train.config import adamw, default_config, model_fields

SCALES = ("demo", "small", "paper")
CAMPAIGNS = ("cpu",)  # a CPU campaign (no fine-tuning stage)
STAGES = tuple(f"finetune_{s}" for s in SCALES)
C4 = "tfds:c4/en:3.1.0"
C4_SAMPLE = "json:../shared/data/c4-en-sample/*.json.gz"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
#: The CPU campaign's epochs, and the E given a second seed per (model, f) (around the
#: peak the first seeds located).
CPU_EPOCHS = (2, 8, 32, 128, 512, 2048)
CPU_SECOND_SEED = {("dec_tiny", 0.5): (32, 128, 512), ("dec_tiny", 0.1): (8, 32, 128)}
#: The sizes trained at a lower learning rate (pre-training 2e-4, fine-tuning 1e-4).
LARGE = ("d300m", "d800m")
#: Fine-tuning stages: scale -> (code corpus, its store, steps, batch, length, peak lr).
FINETUNE = {
    "demo": ("pystdlib", "demo_out/stores/pystdlib-byte", 200, 16, 128, 1e-3),
    "small": ("pystdlib:tests=1", "data/stores/pystdlib-tests-t5spm", 1000, 16, 512, 3e-4),
    "paper": ("pystdlib:tests=1", "data/stores/pystdlib-tests-t5spm", 1000, 8, 1024, 3e-4),
}


def finetune_config(scale: str):
    """The fine-tuning stage of ``scale`` (paper: its f = 0 and f = 10% runs)."""
    source, store, steps, batch, length, lr = FINETUNE[scale]
    c = get_config(scale)
    c.data.source, c.data.store, c.data.length = source, store, length
    c.data.repeated_fraction, c.data.repeated_epochs = 0.0, 1
    c.train.steps, c.train.batch_size = steps, batch
    c.train.checkpoint_every, c.train.keep, c.train.keep_period = steps // 4, 4, 0
    adamw(c, lr=lr, warmup=steps // 20, schedule="cosine", wd=c.train.optimizer.weight_decay)
    main = (lambda r: r.config.data.repeated_fraction in (0.0, 0.1)) if scale == "paper" else None
    c.sweep = sweeps.finetune_sweep(
        get_config(scale),
        select=main,
        fixed={"data.source": source},
        per_model={m: {"train.optimizer.learning_rate": 1e-4} for m in LARGE},
    )
    return c


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
        c.model = model_fields("dec_tiny")
        # The CPU speed settings (docs/benchmarks.md): ~2x the tokens/s of the einsum step
        c.model.update(dict(attention_impl="cpu_fused", scan_unroll=2))
        c.train.steps_per_call = 4
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
        for m, seeds in (("dec_tiny", (0, 1)), ("dec_micro", (0,))):
            sweep += [sweeps.point(m, 0.0, 1, s) for s in seeds]
            for f in (0.5, 0.1):
                sweep += [sweeps.point(m, f, e, 0) for e in CPU_EPOCHS]
                sweep += [sweeps.point(m, f, e, 1) for e in CPU_SECOND_SEED.get((m, f), ())]
                if m == "dec_tiny":  # the unique-data control: the (1 - f) T unique tokens
                    steps = {"train.steps": round(c.train.steps * (1 - f))}
                    sweep.append(sweeps.point(m, 0.0, 1, 0, **steps))
        c.sweep = sweep + [sweeps.point("dec_mini", 0.0, 1, 0)]  # the L(N) fit's third size
    elif arg == "demo":
        c.model = model_fields("dec_tiny")
        c.data.source, c.data.vocab = "builtin", "byte"
        c.data.store = "demo_out/stores/builtin-byte"
        c.data.length = 128
        c.train.steps, c.train.batch_size = 300, 16
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 50, 2, 50
        adamw(c, lr=3e-3, warmup=20, schedule="cosine")
        c.sweep = sweeps.grid(["dec_tiny"], [0.1, 0.5], [10, 100])
    elif arg == "small":
        c.model = model_fields("d1m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"
        c.data.length = 512
        c.train.steps, c.train.batch_size = 10_000, 64
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 500, 2, 1000
        adamw(c, lr=1e-3, warmup=200, schedule="cosine")
        c.sweep = sweeps.grid(["d1m", "d3m", "d10m"], [0.1, 0.5], [10, 100, 1000])
    else:
        c.model = model_fields("d25m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.data.length = 1024
        c.train.batch_size = 512
        c.train.steps = round(100e9 / (512 * 1024))  # T = 100B tokens
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 2000, 2, 10_000
        c.train.compute_dtype = "bfloat16"
        # d800m fits a v4-128 only with the attention dots recomputed (a base-config field:
        # run names are unchanged); docs/launching.md: "Before you pay for a pod".
        c.model.remat_policy = "dots_no_batch"
        adamw(c, lr=1e-3, warmup=c.train.steps // 100, schedule="cosine", wd=0.1)
        c.train.optimizer.clip_norm = 1.0
        models = ["d1m", "d3m", "d10m", "d25m", "d85m", "d300m", "d800m"]
        epochs = [3, 10, 30, 100, 300, 1000, 3000, 10_000]
        lower_lr = {m: {"train.optimizer.learning_rate": 2e-4} for m in LARGE}
        main = sweeps.grid(models, [0.1], epochs, per_model=lower_lr)  # and the baselines
        scans = sweeps.grid(
            models, [0.03, 0.2, 0.5, 0.9], epochs, baselines=False, per_model=lower_lr
        )
        c.sweep = main + scans
    return c
