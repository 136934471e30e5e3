"""The in-context-learning lab: the bursty few-shot task and the clamping demonstration.

A 2-layer attention-only decoder (``attn2_tiny``) trained on the bursty few-shot
classification task of Chan et al. 2022 / Reddy 2023 (an ``icl_bursty:k=v,...`` source,
see ``BURSTY_DEFAULTS``); the evaluator records in-context, flipped-label and in-weights
accuracy at every checkpoint (docs/icl.md).

    python launch/submit.py --config=configs/icl_bursty.py:sweep --root=demo_out/icl

Args (``:arg``; measured by the evaluator on a 2-core CPU):
- ``demo``: the CPU demonstration, unclamped: 600 steps of 128 sequences, a checkpoint
  every 25 steps. Measured: ICL accuracy > 0.9 from step 525 (0.61 at 450 -> 0.97 at 525).
- ``demo_clamped``: the same with head 0 of layer 0 clamped to previous-token attention
  from step 0. Measured: from step 125 (0.55 at 75 -> 0.98 at 125).
- ``sweep`` (default): both runs as one sweep, clamp on and off.
- ``tradeoff``: in-context vs in-weights (Chan et al.): Zipfian trained classes (alpha 1)
  in half the sequences, bursty fraction p_B in {1, 0.5, 0}, 1200 steps. Measured: ICL
  > 0.9 from step 800 / 800 / 700; in-weights accuracy at step 100 0.64 / 0.83 / 0.91;
  flipped-label accuracy ~0.02-0.04 at the end.
- ``paper``: Reddy-like scale (N=8, B=2, K=1024 Zipf alpha=1, eps=0.1, p_C=0.75,
  d_model 256) for accelerators (this suite's choice: unconfirmed).
"""

from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adamw, default_config, model_fields

ARGS = ("demo", "demo_clamped", "sweep", "tradeoff", "paper")

#: The demo task: all training sequences use novel-pool classes (p_C=1), so only ICL can
#: lower the loss; loss on every label (objective option all_labels) speeds learning.
DEMO_TASK = "icl_bursty:K=128,N=8,B=4,L=8,p_C=1.0,p_B=1.0,eps=0.1,E=1,train=80000"
PAPER_TASK = (
    "icl_bursty:K=1024,alpha=1.0,N=8,B=2,L=32,p_C=0.75,p_B=0.9,eps=0.1,E=1,D=63,"
    "novel_classes=1024,unseen_classes=256,train=4000000,eval=2048"
)

#: The clamp of the demonstration: layer 0, head 0 attends perfectly to the previous token.
PREVIOUS_TOKEN_CLAMP = {"kind": "previous_token", "layer": 0, "head": 0, "start_step": 0, "end_step": -1}  # fmt: skip


def _vocab_size(task: str) -> int:
    from repeat_scaling.data import icl_tasks

    _, raw = icl_tasks.parse_spec(task)
    p = icl_tasks.bursty_params(raw)
    n = (
        icl_tasks.FIRST_LABEL
        + p["L"]
        + (p["K"] + p["novel_classes"] + p["unseen_classes"]) * p["E"]
    )
    return padded_vocab_size(n)


def get_config(arg: str = "sweep"):
    if arg not in ARGS:
        raise ValueError(f"configs/icl_bursty.py:{arg}; expected one of {ARGS}")
    c = default_config()
    c.data.objective = "icl"
    c.data.objective_options = {"all_labels": True}
    c.train.progress_bar = "off"
    if arg == "paper":
        task = PAPER_TASK
        c.model = model_fields("attn2_tiny")
        c.model.name, c.model.d_model, c.model.num_heads, c.model.head_dim = (
            "attn2_d256",
            256,
            8,
            32,
        )
        c.data.store = "data/stores/icl_bursty_paper"
        c.train.steps, c.train.batch_size = 30_000, 128
        c.train.checkpoint_every = 250
        adamw(c, lr=1e-3, warmup=500, schedule="cosine")
    else:
        task = DEMO_TASK
        c.model = model_fields("attn2_tiny")  # 2 layers, d_model 64, 4 heads of 16, rope
        c.data.store = "demo_out/stores/icl_bursty_demo"
        c.train.steps, c.train.batch_size = 600, 128
        c.train.checkpoint_every = 25
        c.train.log_every = 25
        adamw(c, lr=2e-3, warmup=20, schedule="constant")
    c.model.vocab_size = _vocab_size(task)
    c.data.source = task
    c.data.vocab = "tokens"  # informational: an icl_* source writes its own tokens:N vocabulary
    c.data.length = 18  # 2N + 2 with N = 8
    c.train.keep, c.train.keep_period = 2, c.train.checkpoint_every
    c.train.z_loss = 0.0
    if arg == "demo_clamped":
        c.interventions = (dict(PREVIOUS_TOKEN_CLAMP),)
    c.sweep = []
    if arg == "tradeoff":
        # Chan et al.: burstiness drives ICL, non-bursty Zipfian data drives in-weights
        # learning. Half the sequences use trained classes (fixed labels, Zipf alpha=1).
        base = "icl_bursty:K=128,alpha=1.0,N=8,B=4,L=8,p_C=0.5,eps=0.1,E=1,train=160000"
        c.train.steps, c.train.checkpoint_every = 1200, 50
        c.train.keep_period = 50
        c.sweep = [
            {
                "data.source": f"{base},p_B={pb}",
                "data.store": f"demo_out/stores/icl_tradeoff_pb{pb}",
            }
            for pb in (1.0, 0.5, 0.0)
        ]
    if arg in ("sweep", "paper"):
        c.sweep = [{"interventions": ()}, {"interventions": (dict(PREVIOUS_TOKEN_CLAMP),)}]
    return c
