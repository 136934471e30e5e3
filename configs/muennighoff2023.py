"""Muennighoff et al. 2023, "Scaling Data-Constrained Language Models".

Decoder-only causal LMs on a grid of model size N, unique tokens U_D and epochs E (total
tokens D = U_D * E: f = 0 at E = 1, else every token from a U_D-token subset), for the
report's fit of the data-constrained scaling law (REFERENCE.md section 1).

    python launch/submit.py --config=configs/muennighoff2023.py:demo --root=demo_out/dc

Scales (`:arg`; `train.steps` = U_D * E / tokens per step is part of each run's name):
- `demo`: `dec_tiny`, `d1m` on the built-in corpus, 16 x 128 bytes per step, U_D in
  {2^16, 2^17} x E in {1, 4}: 8 runs of 32 to 256 steps.
- `small`: `d1m`-`d10m` on C4, 64 x 512 tokens per step, U_D in {2^25, 2^27} x E in
  {1, 4, 16}: 18 runs.
- `paper`: `d10m`-`d800m`, 256 x 2048 tokens per step, U_D in {0.5B, 2B, 8B} x E in
  {1, 2, 4, 8, 16}: 75 runs (the paper goes to 9B parameters and 1500 epochs; optimiser
  unconfirmed: AdamW, cosine to 10%, 1% warmup).
"""

import math

from repeat_scaling import sweeps
from repeat_scaling.data.vocab import BYTE_VOCAB_SIZE
from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adamw, default_config, model_fields

SCALES = ("demo", "small", "paper")
C4 = "tfds:c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def get_config(arg: str = "demo"):
    if arg not in SCALES:
        raise ValueError(f"configs/muennighoff2023.py:{arg}; expected one of {SCALES}")
    c = default_config()
    c.data.objective = "causal_lm"
    c.train.log_every = 10 if arg == "demo" else 100
    if arg == "demo":
        c.model = model_fields("dec_tiny")
        c.data.source, c.data.vocab = "builtin", "byte"
        c.data.store = "demo_out/stores/builtin-byte"
        c.data.length, c.train.batch_size = 128, 16
        c.train.checkpoint_every, c.train.keep = 32, 2
        adamw(c, lr=3e-3, warmup=10, schedule="cosine")
        models, uniques, epochs = ["dec_tiny", "d1m"], [2**16, 2**17], [1, 4]
    elif arg == "small":
        c.model = model_fields("d1m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"
        c.data.length, c.train.batch_size = 512, 64
        c.train.checkpoint_every, c.train.keep = 1000, 2
        adamw(c, lr=1e-3, warmup=100, schedule="cosine")
        models, uniques, epochs = ["d1m", "d3m", "d10m"], [2**25, 2**27], [1, 4, 16]
    else:
        c.model = model_fields("d85m")
        c.data.source, c.data.vocab = C4, T5_VOCAB
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.data.length, c.train.batch_size = 2048, 256
        c.train.compute_dtype = "bfloat16"
        # Fit on a v4-128 (docs/launching.md: "Before you pay for a pod"): d800m at 256 x 2048 needs
        # 114.7 GiB per chip without rematerialisation; the evaluator's attention-weights
        # program (probes) at 8 rows needs 48.5 GiB per chip on a v4-8, 4 rows halve it.
        c.model.remat_policy = "dots_no_batch"
        c.eval.batch_size = 4
        c.train.checkpoint_every, c.train.keep = 2000, 2
        adamw(c, lr=2e-4, warmup=500, schedule="cosine", wd=0.1)
        c.train.optimizer.clip_norm = 1.0
        models = ["d10m", "d25m", "d85m", "d300m", "d800m"]
        uniques, epochs = [500_000_000, 2_000_000_000, 8_000_000_000], [1, 2, 4, 8, 16]
    c.train.optimizer.end_learning_rate_fraction = 0.1
    # The byte vocabulary needs 384 embedding rows, not the named sizes' 32128.
    extra = {"model.vocab_size": padded_vocab_size(BYTE_VOCAB_SIZE)} if arg == "demo" else {}
    tokens_per_step = c.data.length * c.train.batch_size
    c.sweep = [
        sweeps.all_repeated(m, e, **{"train.steps": math.ceil(u * e / tokens_per_step)}, **extra)
        for m in models
        for u in uniques
        for e in epochs
    ]
    return c
