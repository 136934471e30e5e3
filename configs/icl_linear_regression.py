"""In-context linear regression (von Oswald et al. 2022, "Transformers learn in-context by
gradient descent"): tasks ``y = w . x`` with a fresh ``w`` per sequence. Details and
measurements: docs/icl.md.

``:demo`` (d = 5, n = 10, 500 steps of 512 tasks), ``:paper`` (d = 10, n = 10, 5000 x 2048):
a linear self-attention model trained on the tasks, compared on held-out tasks with the
one-step-GD construction; extra args ``,layers=K`` (vs K GD steps) and ``,heads=H``::

    python -m repeat_scaling.train.icl_regression \\
        --config=configs/icl_linear_regression.py:demo --workdir=runs/lsa_demo

``:tokens`` (``dec_tiny``), ``:tokens_attn2`` (``attn2_tiny``): the task as token sequences
(d = 1, n = 8, 16 x-bins, 32 y-bins) for the normal trainer::

    python -m repeat_scaling.train --config=configs/icl_linear_regression.py:tokens \\
        --workdir=runs/icl_regression_tokens

Measured on the 2-core CPU: held-out loss trained / GD 1.004 for ``:demo`` (about 11 s),
1.002 for ``:paper`` (227 s of training), 0.64 for ``:demo,layers=2`` against two GD steps;
``:tokens`` query y-bin accuracy 0.964 after 2000 steps (about 6 min).
"""

from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adamw, default_config, model_fields

LSA_SCALES = ("demo", "paper")
TOKEN_SCALES = {"tokens": "dec_tiny", "tokens_attn2": "attn2_tiny"}

#: The token task of ``:tokens`` (the ``icl_regression:k=v,...`` spec parameters).
TOKEN_TASK = {"d": 1, "n": 8, "x_bins": 16, "y_bins": 32, "train": 128_000, "validation": 1024}


def token_spec(params: dict) -> str:
    """``icl_regression:k=v,...`` for ``params`` (sorted keys, so the store name is stable)."""
    return "icl_regression:" + ",".join(f"{k}={params[k]}" for k in sorted(params))


def _lsa_config(scale: str, extra: dict):
    from repeat_scaling.train.icl_regression import default_config as lsa_default

    c = lsa_default()
    if scale == "demo":
        c.task.d, c.task.n = 5, 10
        c.train.steps, c.train.batch_size, c.train.learning_rate = 500, 512, 3e-3
        c.train.log_every, c.train.eval_every = 50, 250
        c.eval.tasks, c.eval.eta_tasks = 4000, 50_000
    else:
        c.task.d, c.task.n = 10, 10
        c.train.steps, c.train.batch_size, c.train.learning_rate = 5000, 2048, 1e-3
        c.train.log_every, c.train.eval_every = 100, 1000
    for k, v in extra.items():
        if k == "layers":
            c.model.num_layers = int(v)
        elif k == "heads":
            c.model.num_heads = int(v)
        else:
            raise ValueError(f"configs/icl_linear_regression.py: unknown arg {k}={v}; expected layers=K or heads=H")  # fmt: skip
    return c


def _token_config(scale: str):
    from repeat_scaling.data.icl_regression import FIRST_VALUE_ID

    c = default_config()
    spec = token_spec(TOKEN_TASK)
    vocab = FIRST_VALUE_ID + TOKEN_TASK["x_bins"] + TOKEN_TASK["y_bins"]
    c.model = model_fields(TOKEN_SCALES[scale])
    c.model.vocab_size = padded_vocab_size(vocab)
    c.data.source, c.data.vocab = spec, f"tokens:{vocab}"
    c.data.store = "demo_out/stores/" + spec.replace(":", "-").replace(",", "_").replace("=", "")
    c.data.objective = "icl"
    c.data.length = (TOKEN_TASK["n"] + 1) * (TOKEN_TASK["d"] + 1)
    c.data.objective_options.all_labels = True
    c.train.steps, c.train.batch_size = 2000, 64  # = TOKEN_TASK["train"] sequences, once
    c.train.log_every, c.train.checkpoint_every, c.train.keep = 50, 250, 8
    c.train.eval_every, c.train.eval_batches = 250, 4
    adamw(c, lr=3e-3, warmup=50, schedule="cosine")
    return c


def get_config(arg: str = "demo"):
    scale, *rest = arg.split(",")
    extra = {}
    for item in rest:
        if "=" not in item:
            raise ValueError(f"configs/icl_linear_regression.py:{arg}; extra args are k=v")
        k, v = item.split("=", 1)
        extra[k] = v
    if scale in LSA_SCALES:
        return _lsa_config(scale, extra)
    if scale in TOKEN_SCALES and not extra:
        return _token_config(scale)
    raise ValueError(
        f"configs/icl_linear_regression.py:{arg}; expected one of "
        f"{LSA_SCALES + tuple(TOKEN_SCALES)} (LSA scales take ,layers=K / ,heads=H)"
    )
