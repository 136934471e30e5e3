"""Demo: a tiny model on the built-in corpus (byte vocabulary, store prepared on first use
under ``demo_out/stores/``), a few steps per second on a laptop CPU.

    python -m repeat_scaling.train --config=configs/demo.py --workdir=/tmp/demo
    python -m repeat_scaling.train --config=configs/demo.py:t5 --workdir=/tmp/demo_t5

Args (``:arg``):
- ``dec`` (default): ``dec_tiny``, causal LM, 300 steps; ``config.sweep``: f = 0 and
  f = 10% at E = 10 and 50.
- ``t5``: ``t5_tiny`` with span corruption, same budget and sweep.
- ``sweep``: the `make demo` sweep (``python launch/demo.py``): ``dec_micro`` (45k
  parameters) on 1.74M tokens, f = 0 and f = 50% at E = 1, 4, 16, 64, 256, 1024: 7 runs.
  Measured (2-core CPU): the final test loss peaks at E = 256 (2.94 nats/byte against
  2.28 without repetition, 2.34 at E = 64 and 2.76 at E = 1024), where the repeated
  subset is first memorised.
"""

from repeat_scaling.data.vocab import BYTE_VOCAB_SIZE
from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adamw, default_config, model_fields

#: The demo's repeated epochs: 3 decades at f = 50%.
DEMO_EPOCHS = (1, 4, 16, 64, 256, 1024)


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
    c.model.vocab_size = padded_vocab_size(BYTE_VOCAB_SIZE)
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
        # `make demo`: double descent on the built-in corpus. The 45k-parameter decoder
        # sees 1.74M tokens (850 steps of 16 x 128, 38 tokens per parameter), half of them
        # from a subset repeated E = 1 ... 1024 times, plus the f = 0 baseline: 7 runs,
        # each evaluated at every 170 steps.
        c.model = model_fields("dec_micro")
        c.train.steps = 850
        c.train.checkpoint_every = 170
        c.train.keep = 5
        c.eval.update(dict(test_batches=64, memorisation_examples=64))
        c.sweep = [{"data.repeated_fraction": 0.0, "data.repeated_epochs": 1}] + [
            {"data.repeated_fraction": 0.5, "data.repeated_epochs": e} for e in DEMO_EPOCHS
        ]
    return c
