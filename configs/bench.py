"""The peer models of ../shared/bench/README.md, for ``python -m repeat_scaling.bench train``.

* ``:t5_peer``: T5 v1.1-style, d_model 256, d_ff 1024 (gated-GeLU), 4 heads x 64,
  4 encoder + 4 decoder layers, vocab 32128, untied, dropout 0; batch 8, inputs 512,
  targets 114 (span-corruption shape); 5,008 processed tokens per step.
* ``:gpt_peer``: decoder-only, d_model 256, d_ff 1024, 4 layers, 4 heads x 64,
  vocab 32128, context 512, batch 8, dropout 0; 4,096 tokens per step.
  (Differences from the GPT-2 peer, which this suite's decoder-only family does not
  offer: gated-GeLU MLP, RoPE, RMSNorm, untied output projection.)

Both train with AdamW at lr 1e-4 (constant), no z-loss; ``--config.train.compute_dtype``
(or the benchmark's ``--dtype``) selects float32 or bfloat16 compute.

Accelerator sizes (too large for a CPU step; run them where a GPU/TPU exists):

* ``:t5_base``: T5 v1.1 base (d_model 768, 12 + 12 layers, 32128 vocab), span
  corruption 512 / 114, batch 128, scanned layers, dropout 0.
* ``:d1b``: the 1B decoder-only of ``models.sizes`` (d_model 2048, 20 layers, 16 heads
  x 128), causal LM at sequence 2048, batch 16, scanned layers with ``dots`` remat,
  ``jax.nn.dot_product_attention`` (``--set model.attention_impl=cudnn`` on an NVIDIA
  GPU for the fused kernel).
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
