"""Demo: a tiny model on the built-in corpus, a few steps per second on a laptop CPU.

    python -m repeat_scaling.train --config=configs/demo.py --workdir=/tmp/demo
    python -m repeat_scaling.train --config=configs/demo.py:t5 --workdir=/tmp/demo_t5

``configs/demo.py`` (or ``:dec``) trains the tiny decoder-only model with the causal LM
objective; ``:t5`` trains the tiny T5 (encoder-decoder) with span corruption. Both use
the byte vocabulary, so the store is prepared on first use (seconds) under
``demo_out/stores/``. ``config.sweep`` lists overrides for a small repetition sweep
(unique baseline vs. 10% of the tokens repeated 10 and 50 times); ``:sweep`` is the
`make demo` sweep (f = 0 and 50% at E = 4, 32, 256, plus one tiny T5 run), run by
``python launch/demo.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _base import BYTE_VOCAB_SIZE, adamw, default_config, model_fields  # noqa: E402


def get_config(arg: str = "dec"):
    if arg not in ("dec", "t5", "sweep"):
        raise ValueError(f"configs/demo.py:{arg}; expected ':dec', ':t5' or ':sweep'")
    c = default_config()
    c.seed = 0
    c.data.source = "builtin"
    c.data.vocab = "byte"
    c.data.store = "demo_out/stores/builtin-byte"
    c.data.repeated_fraction = 0.0
    c.data.repeated_epochs = 1
    if arg in ("dec", "sweep"):
        c.model = model_fields("dec_tiny")
        c.data.objective = "causal_lm"
        c.data.length = 128
    else:
        c.model = model_fields("t5_tiny")
        c.data.objective = "span_corruption"
        c.data.inputs_length = 128
    c.model.vocab_size = BYTE_VOCAB_SIZE
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep = 2
    c.train.z_loss = 1e-4
    adamw(c, lr=3e-3, warmup=20, schedule="cosine")
    c.train.optimizer.end_learning_rate_fraction = 0.1
    c.sweep = [
        {"data.repeated_fraction": 0.0, "data.repeated_epochs": 1},
        {"data.repeated_fraction": 0.1, "data.repeated_epochs": 10},
        {"data.repeated_fraction": 0.1, "data.repeated_epochs": 50},
    ]
    if arg == "sweep":
        # `make demo`: the tiny decoder at f = 0 and f = 50% with three repeated-epoch
        # values (the double-descent axis), plus one tiny T5 span-corruption run; a
        # checkpoint every 50 steps, all kept, so the evaluator draws whole curves.
        c.train.checkpoint_every = 50
        c.train.keep = 6
        c.sweep = [
            {"data.repeated_fraction": 0.0, "data.repeated_epochs": 1},
            {"data.repeated_fraction": 0.5, "data.repeated_epochs": 4},
            {"data.repeated_fraction": 0.5, "data.repeated_epochs": 32},
            {"data.repeated_fraction": 0.5, "data.repeated_epochs": 256},
            {
                "model.name": "t5_tiny",
                "data.objective": "span_corruption",
                "data.inputs_length": 128,
            },
        ]
    return c
