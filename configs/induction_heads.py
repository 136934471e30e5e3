"""Induction heads under repetition (Hernandez et al. 2022, section 5; Olsson et al. 2022).

Two-layer attention-only decoders trained with and without repeated data (f = 50% from a
small repeated subset weakens induction heads); checkpoints every few hundred steps
(``keep_period``) let the evaluator trace the probe scores over training.

    python launch/submit.py --config=configs/induction_heads.py:demo --root=demo_out/ih

Scales (`:arg`):
- `demo`: `attn2_tiny` on the built-in corpus, 600 steps of 16 x 128 bytes; f = 0 and
  f = 50% at E = 100: 2 runs.
- `cpu`: Hernandez (c), `attn2_tiny` on synthetic text with in-document copies
  (`CPU_SOURCE`), 1000 steps of 16 x 256; f = 0 and 50% at E = 100, two seeds: 4 runs
  (8.0 min for the four with their evaluation, alone on 2 cores). Measured: previous-token
  heads 0.33-0.41 but no induction head (prefix matching 0.036-0.043 at f = 0, chance
  0.031): not testable on a CPU (docs/reproducing.md).
- `small`: d_model 512, 8 heads, C4, 20k steps of 32 x 1024; f = 0 and 50% at E in
  {100, 1000}, 2 seeds: 6 runs.
- `paper`: d_model 768, 12 heads, 100k steps of 256 x 1024 (26B tokens); f = 0 and 50%
  at E in {10, 100, 1000, 10000}: 5 runs (width and budget unconfirmed).
"""

from repeat_scaling.train.config import adamw, default_config, model_fields

SCALES = ("demo", "cpu", "small", "paper")
#: The CPU campaign's text: bursty in-document copies of 2-8 words in ~250-byte documents,
#: so that copying from the context pays within a 256-byte window.
CPU_SOURCE = "synthetic:num_docs=40000,doc_words=40,p_copy=0.3,seed=1"
C4 = "tfds:c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def _attention_only(name: str, d_model: int, heads: int):
    """A 2-layer attention-only model of the given width (from `attn2_tiny`)."""
    m = model_fields("attn2_tiny")
    m.name, m.d_model, m.num_heads, m.head_dim = name, d_model, heads, 64
    return m


def get_config(arg: str = "demo"):
    if arg not in SCALES:
        raise ValueError(f"configs/induction_heads.py:{arg}; expected one of {SCALES}")
    c = default_config()
    c.data.objective = "causal_lm"
    c.train.log_every = 10 if arg == "demo" else 100
    if arg == "demo":
        c.model = model_fields("attn2_tiny")
        c.data.source, c.data.vocab = "builtin", "byte"
        c.data.store = "demo_out/stores/builtin-byte"
        c.data.length = 128
        c.train.steps, c.train.batch_size = 600, 16
        every, epochs, seeds = 100, [100], [0]
        adamw(c, lr=3e-3, warmup=20, schedule="cosine")
    elif arg == "cpu":
        c.model = model_fields("attn2_tiny")
        c.data.source, c.data.vocab = CPU_SOURCE, "byte"
        c.data.store = "demo_out/stores/synthetic-copies-byte"
        c.data.length = 256
        c.train.steps, c.train.batch_size = 1000, 16  # 4.1M tokens, 50 per parameter
        c.eval.update(dict(test_batches=64, memorisation_examples=64))
        every, epochs, seeds = 250, [100], [0, 1]
        adamw(c, lr=3e-3, warmup=20, schedule="cosine")
    elif arg == "small":
        c.model = _attention_only("attn2_d512", 512, 8)
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"
        c.data.length = 1024
        c.train.steps, c.train.batch_size = 20_000, 32
        every, epochs, seeds = 500, [100, 1000], [0, 1]
        adamw(c, lr=1e-3, warmup=500, schedule="cosine")
    else:
        c.model = _attention_only("attn2_d768", 768, 12)
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.data.length = 1024
        c.train.steps, c.train.batch_size = 100_000, 256
        c.train.compute_dtype = "bfloat16"
        every, epochs, seeds = 1000, [10, 100, 1000, 10_000], [0]
        adamw(c, lr=1e-3, warmup=1000, schedule="cosine")
    c.train.checkpoint_every, c.train.keep, c.train.keep_period = every, 2, every
    c.sweep = []
    for seed in seeds:
        c.sweep.append({"data.repeated_fraction": 0.0, "data.repeated_epochs": 1, "seed": seed})
        for e in epochs:
            c.sweep.append({"data.repeated_fraction": 0.5, "data.repeated_epochs": e, "seed": seed})  # fmt: skip
    return c
