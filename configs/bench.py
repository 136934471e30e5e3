"""The benchmark models of ``python -m repeat_scaling.bench train`` (docs/benchmarks.md).

The peer models of ../shared/bench/README.md (same sizes, batch, lengths; AdamW at a
constant 1e-4, no z-loss, 3 warm-up + 20 timed steps) and two accelerator sizes;
``--dtypes`` (or ``--config.train.compute_dtype``) selects float32 or bfloat16 compute.

    python -m repeat_scaling.bench train --config=configs/bench.py:t5_peer

Args (``:arg``):
- ``t5_peer``: T5 v1.1-style, d_model 256, d_ff 1024, 4 heads x 64, 4 + 4 layers, vocab
  32128, span corruption 512 / 114, batch 8 (5,008 tokens per step). Measured (2-core
  CPU, fp32): 1.17x the tokens/s of the PyTorch peer.
- ``gpt_peer``: decoder-only, d_model 256, d_ff 1024, 4 layers, 4 heads x 64, context
  512, batch 8 (4,096 tokens per step; gated-GeLU, RoPE, RMSNorm and an untied output
  unlike GPT-2). Measured: 1.11x the GPT-2 peer.
- ``t5_base``: T5 v1.1 base, span corruption 512 / 114, batch 128, scanned; for a GPU/TPU.
- ``d1b``: the 1B decoder-only of ``models.sizes``, sequence 2048, batch 16, scanned with
  ``dots`` remat (``--set model.attention_impl=cudnn`` on an NVIDIA GPU); for a GPU/TPU.
"""

from repeat_scaling.train.config import adamw, default_config, model_fields

PEERS = ("t5_peer", "gpt_peer")
ACCELERATOR = ("t5_base", "d1b")


def get_config(arg: str = "t5_peer"):
    if arg not in PEERS + ACCELERATOR:
        raise ValueError(f"configs/bench.py:{arg}; expected one of {PEERS + ACCELERATOR}")
    if arg in ACCELERATOR:
        return _accelerator_config(arg)
    c = default_config()
    common = dict(
        vocab_size=32128,
        d_model=256,
        d_ff=1024,
        num_heads=4,
        head_dim=64,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        droppath_rate=0.0,
        num_experts=0,
        param_share=False,
        attention_only=False,
        dtype="float32",
        # Unrolled layers: on XLA:CPU the scanned stack's stacked residual buffers
        # (zero-filled, then written and read back per layer) cost ~13% of t5_peer's step.
        scan_layers=False,
    )
    if arg == "t5_peer":
        c.model = model_fields("t5_tiny")
        c.model.update(common)
        c.model.update(dict(num_encoder_layers=4, num_decoder_layers=4, name="t5_peer"))
        c.data.objective = "span_corruption"
        c.data.inputs_length = 512
        c.data.targets_length = 114
    else:
        c.model = model_fields("dec_tiny")
        c.model.update(common)
        c.model.update(dict(num_decoder_layers=4, name="gpt_peer"))
        c.data.objective = "causal_lm"
        c.data.length = 512
    c.train.batch_size = 8
    return _bench_training(c)


def _bench_training(c):
    """What every benchmark config shares: AdamW at a constant 1e-4, no z-loss, 23 steps
    (3 warm-up + 20 timed, as the peers); the store is not read by the benchmark."""
    c.data.store = "demo_out/stores/builtin-32k"
    c.train.steps = 23
    c.train.z_loss = 0.0
    adamw(c, lr=1e-4, warmup=0, schedule="constant")
    return c


def _accelerator_config(arg: str):
    c = default_config()
    c.model = model_fields(arg)
    c.model.update(
        dict(dropout_rate=0.0, attention_dropout_rate=0.0, droppath_rate=0.0, scan_layers=True)
    )
    if arg == "t5_base":
        c.data.objective = "span_corruption"
        c.data.inputs_length = 512
        c.data.targets_length = 114
        c.train.batch_size = 128
    else:
        c.model.update(dict(remat_policy="dots", attention_impl="xla"))
        c.data.objective = "causal_lm"
        c.data.length = 2048
        c.train.batch_size = 16
    c.train.compute_dtype = "bfloat16"
    return _bench_training(c)
