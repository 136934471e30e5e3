"""Tiny configs for the compile-check tests (tests/test_compile.py): `tests/tiny_compile_config.py:ARG`.

* `fits`: a 2-layer decoder-only (d_model 128, d_ff 512), batch 16 x 64 tokens, scanned
  layers; two sweep entries sharing one program. Compiles in a few seconds.
* `flops`: wider (d_model 512, d_ff 4096) so that matmuls dominate its FLOPs, scanned;
  `unrolled`: the same with `scan_layers=False`.
* `oom`: the wide model with a batch no TPU chip holds (2^17 x 64 tokens).

The store does not exist: the compile check needs only the shapes.
"""

import ml_collections

from repeat_scaling.train.config import default_config

MODEL = dict(
    arch="decoder_only", vocab_size=256, d_model=128, d_ff=512, num_heads=2, head_dim=64,
    num_encoder_layers=0, num_decoder_layers=2, position="rope", dtype="bfloat16",
    name="compile_tiny",
)  # fmt: skip
WIDE = dict(d_model=512, d_ff=4096, num_heads=8)
ARGS = ("fits", "flops", "unrolled", "oom")


def get_config(arg: str = "fits"):
    if arg not in ARGS:
        raise ValueError(f"tests/tiny_compile_config.py:{arg}; expected one of {ARGS}")
    from repeat_scaling.models.config import ModelConfig

    c = default_config()
    model = {**MODEL, **(WIDE if arg != "fits" else {})}
    c.model = ml_collections.ConfigDict(
        ModelConfig(**model, scan_layers=arg != "unrolled").to_dict()
    )
    c.data.store = "data/stores/compile-tiny-does-not-exist"
    c.data.objective = "causal_lm"
    c.data.length = 64
    c.train.steps = 100
    c.train.batch_size = 2**17 if arg == "oom" else 16
    c.sweep = [
        {"data.repeated_fraction": 0.0, "data.repeated_epochs": 1},
        {"data.repeated_fraction": 0.1, "data.repeated_epochs": 10},
    ]
    return c
