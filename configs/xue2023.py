"""Xue et al. 2023, "To Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis".

T5 v1.1 encoder-decoders pre-trained with span corruption (MLM) on C4 at a FIXED total
token budget: U unique tokens repeated E = budget / U times (f = 100% of the tokens
come from the repeated subset; E = 1 is the unique baseline, written f = 0). The sweep
covers model size, UL2 vs MLM, regularisation under repetition (dropout, staged
dropout, DropPath, label smoothing), MoE vs dense and ParamShare.

    python launch/submit.py --config=configs/xue2023.py:demo --root=demo_out/xue

Scales (`:arg`):
- `demo`: `t5_tiny` on the built-in corpus (byte vocabulary), 300 steps of 16 x 128
  inputs; E in {1, 8, 32}, plus UL2 and dropout 0.1 at E = 32: 5 runs.
- `cpu`: Xue (d) on a 2-core CPU: `t5_tiny` (247k parameters) with span corruption on
  the built-in corpus (byte vocabulary), 800 steps of 16 x 128 inputs (1.8M store tokens,
  the whole corpus once at E = 1); all data repeated (f = 1) at E in {4, 16, 64, 256}
  against the unique baseline, second seeds at E = 1 and 256, dropout 0.1 and staged
  dropout (0.1 from step 400) at E = 256, UL2 at E = 1 and 256: 12 runs. Measured: 31.5
  min on 2 cores beside another campaign; test loss 2.494 (E = 1, mean of 2 seeds) ->
  2.897 (E = 256); dropout 0.1 removes 49% of that degradation, staged dropout 33%
  (docs/reproducing.md).
- `small`: `t5_small`, 2^14 steps of 32 x 512 inputs (2^28 tokens) on C4; E in
  {1, 4, 16, 64} for MLM, UL2 and MoE at E in {1, 64}, regularisation at E = 64: 12 runs.
- `paper`: `t5_base`/`t5_large`/`t5_xl`, 2^19 steps of 128 x 512 inputs (2^35 tokens),
  unique tokens 2^35 ... 2^27 (E = 1 ... 2^8); UL2 vs MLM on T5-Base; dropout 0.1/0.3,
  staged dropout (0.1 from step 2^18), DropPath 0.1, label smoothing 0.1 at E = 16 and
  256; `t5_base_moe8` and `t5_base_share` (ParamShare) at E in {1, 16, 256}: 53 runs.
  Adafactor with the T5 defaults (inverse-sqrt decay, 10k warmup).

UL2 needs an explicit targets length: 512 at `small`/`paper`, 128 at `demo` (the
R/X/S mixture of REFERENCE.md section 3; the length is this suite's choice, not the
paper's: unconfirmed).

Fine-tuning stages (`:finetune_demo`, `:finetune_small`, `:finetune_paper`): the
pre-trained T5s fine-tuned text-to-text with the `supervised` objective on a downstream
"pairs" store, each started from a pre-training run of the same scale
(`init_from="{root}/<pre-training run name>"`, resolved by `repeat_scaling/sweeps.py` to the same
`--root`), plus one from-scratch run per model; the evaluator adds downstream EM / F1 and
the report's Xue table puts them next to the pre-training data and its C4 accuracy.
Prepare the task store once, then run the pre-training stage, then the fine-tuning one:

    python -m repeat_scaling.prepare --task=builtin_task:copy_word --vocab=byte \
        --out=demo_out/stores/copy_word-byte --inputs_length=32 --targets_length=16
    python launch/submit.py --config=configs/xue2023.py:finetune_demo --root=demo_out/xue

- `finetune_demo`: every demo run (5) + 1 from scratch on `builtin_task:copy_word` (1,789
  training words, offline): 3 epochs (f = 1, E = 3 over 1,760 examples: 330 steps of 16).
- `finetune_small`: the MLM `t5_small` runs (E = 1, 4, 16, 64) + 1 from scratch on SQuAD
  v1.1 (`--task=squad --inputs_length=512 --targets_length=32`, 87,599 training
  examples): 2,720 steps of 32 (one epoch).
- `finetune_paper`: the MLM `t5_base` runs (E = 1 ... 256) + 1 from scratch on SQuAD:
  3 epochs (f = 1, E = 3 over 87,040 examples: 2,040 steps of 128).
Fine-tuning optimiser: the T5 recipe (Adafactor, constant lr 1e-3) at small/paper, AdamW
1e-3 constant at demo (this suite's choice; Xue et al. do not list theirs: unconfirmed).
"""

from repeat_scaling import sweeps
from repeat_scaling.train.config import adafactor_t5, adamw, default_config, model_fields

SCALES = ("demo", "small", "paper")
CAMPAIGNS = ("cpu",)  # a CPU campaign (no fine-tuning stage)
STAGES = tuple(f"finetune_{s}" for s in SCALES)
TASK_STORES = {  # (store, task spec, inputs_length, targets_length)
    "demo": ("demo_out/stores/copy_word-byte", "builtin_task:copy_word", 32, 16),
    "small": ("data/stores/squad-t5spm-512-32", "squad", 512, 32),
    "paper": ("data/stores/squad-t5spm-512-32", "squad", 512, 32),
}
C4 = "tfds:c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def _run(model, epochs, **extra):
    """One sweep entry: E = 1 is the unique baseline (f = 0), else f = 1 with E epochs."""
    f = 0.0 if epochs == 1 else 1.0
    return {"model.name": model, "data.repeated_fraction": f, "data.repeated_epochs": epochs,
            "seed": 0, **extra}  # fmt: skip


def _ul2(targets_length):
    return {"data.objective": "ul2", "data.targets_length": targets_length}


def finetune_config(scale: str):
    """The fine-tuning stage of ``scale``: see the module docstring."""
    c = get_config(scale)
    sources = sweeps.expand(c, sweeps.ROOT_TEMPLATE)
    if scale != "demo":  # the plain MLM runs of the main model (no UL2, MoE, regulariser)
        core = set(sweeps.CORE_KEYS)
        sources = [r for r in sources if set(r.overrides) <= core]
        sources = [r for r in sources if r.config.model.name == c.model.name]
    store, _, inputs_length, targets_length = TASK_STORES[scale]
    c.data.store, c.data.source, c.data.objective = store, "", "supervised"
    c.data.inputs_length, c.data.targets_length = inputs_length, targets_length
    c.data.objective_options = {}
    steps, batch, fraction, epochs = {"demo": (330, 16, 1.0, 3), "small": (2720, 32, 0.0, 1),
                                      "paper": (2040, 128, 1.0, 3)}[scale]  # fmt: skip
    c.data.repeated_fraction, c.data.repeated_epochs = fraction, epochs
    c.train.steps, c.train.batch_size = steps, batch
    c.train.checkpoint_every = steps // 5
    c.train.keep, c.train.keep_period = 5, 0
    if scale == "demo":
        adamw(c, lr=1e-3, warmup=0, schedule="constant")
    else:
        adafactor_t5(c)
        c.train.optimizer.learning_rate, c.train.optimizer.schedule = 1e-3, "constant"
        c.train.optimizer.warmup_steps = 0

    def entry(run, **extra):
        return {"model.name": run.config.model.name, "data.objective": "supervised",
                "seed": 0, **extra}  # fmt: skip

    c.sweep = sweeps.finetune_sweep(sources, entry)
    return c


#: The CPU campaign's epochs over the training data (E = 1: the unique baseline).
CPU_EPOCHS = (1, 4, 16, 64, 256)


def cpu_config(c):
    """Xue (d) on a 2-core CPU: see the module docstring (`cpu`)."""
    m = "t5_tiny"
    c.model = model_fields(m)
    c.data.source, c.data.vocab = "builtin", "byte"
    c.data.store = "demo_out/stores/builtin-byte"
    c.data.inputs_length = 128
    c.train.steps, c.train.batch_size = 800, 16  # 1.81M store tokens: the whole corpus once
    c.train.log_every = 50
    c.train.checkpoint_every, c.train.keep, c.train.keep_period = 200, 4, 0
    adamw(c, lr=3e-3, warmup=20, schedule="cosine")
    c.eval.update(dict(test_batches=64, memorisation_examples=64))
    worst = CPU_EPOCHS[-1]
    dropout = {"model.dropout_rate": 0.1}
    staged = {**dropout, "train.dropout_start_step": c.train.steps // 2}
    sweep = [_run(m, e) for e in CPU_EPOCHS]
    sweep += [_run(m, e, seed=1) for e in (1, worst)]
    sweep += [_run(m, worst, **dropout), _run(m, worst, seed=1, **dropout)]
    sweep += [_run(m, worst, **staged)]
    sweep += [_run(m, e, **_ul2(128)) for e in (1, worst)]
    c.sweep = sweep
    return c


def get_config(arg: str = "demo"):
    if arg in STAGES:
        return finetune_config(arg.removeprefix("finetune_"))
    if arg not in SCALES + CAMPAIGNS:
        raise ValueError(f"configs/xue2023.py:{arg}; expected one of {SCALES + CAMPAIGNS + STAGES}")
    c = default_config()
    c.data.objective = "span_corruption"
    c.train.log_every = 10 if arg == "demo" else 100
    if arg == "demo":
        c.model = model_fields("t5_tiny")
        c.data.source, c.data.vocab = "builtin", "byte"
        c.data.store = "demo_out/stores/builtin-byte"
        c.data.inputs_length = 128
        c.train.steps, c.train.batch_size = 300, 16
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 50, 2, 50
        adamw(c, lr=3e-3, warmup=20, schedule="cosine")
        m = "t5_tiny"
        c.sweep = [_run(m, 1), _run(m, 8), _run(m, 32), _run(m, 32, **_ul2(128)),
                   _run(m, 32, **{"model.dropout_rate": 0.1})]  # fmt: skip
        return c

    if arg == "cpu":
        return cpu_config(c)
    c.data.source, c.data.vocab = C4, T5_VOCAB
    c.data.inputs_length = 512
    adafactor_t5(c)
    if arg == "small":
        c.model = model_fields("t5_small")
        c.data.store = "data/stores/c4-t5spm"
        c.train.steps, c.train.batch_size = 2**14, 32
        c.train.optimizer.warmup_steps = 1000
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 1000, 2, 2000
        m, hi, epochs = "t5_small", 64, (1, 4, 16, 64)
        sweep = [_run(m, e) for e in epochs] + [_run(m, e, **_ul2(512)) for e in (1, hi)]
        sweep += [_run("t5_small_moe8", e) for e in (1, hi)]
        reg_epochs, reg_model = (hi,), m
    else:
        c.model = model_fields("t5_base")
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.train.steps, c.train.batch_size = 2**19, 128
        c.train.compute_dtype = "bfloat16"
        # FSDP over 8 devices: pure data parallelism puts T5-XL at 48.9 GiB per chip on a
        # v4-128 (15.1 GiB of replicated float32 parameters and optimizer state, 33.8 GiB
        # of temporaries); sharding them over fsdp=8 brings it to 13.7 GiB. Every run of
        # the sweep shares the mesh (a base-config key: run names are unchanged). docs/launching.md:
        # "Before you pay for a pod".
        c.mesh.ici.fsdp = 8
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 5000, 2, 20_000
        epochs = tuple(2**k for k in range(9))  # 1 ... 256: unique tokens 2^35 ... 2^27
        sweep = [_run(m, e) for m in ("t5_base", "t5_large", "t5_xl") for e in epochs]
        sweep += [_run("t5_base", e, **_ul2(512)) for e in epochs]
        sweep += [_run(m, e) for m in ("t5_base_moe8", "t5_base_share") for e in (1, 16, 256)]
        sweep += [_run("t5_base_moe8", 256, **{"model.dropout_rate": 0.1})]
        reg_epochs, reg_model = (16, 256), "t5_base"
    staged = c.train.steps // 2
    for e in reg_epochs:
        sweep += [
            _run(reg_model, e, **{"model.dropout_rate": 0.1}),
            _run(reg_model, e, **{"model.dropout_rate": 0.1, "train.dropout_start_step": staged}),
            _run(reg_model, e, **{"model.droppath_rate": 0.1}),
            _run(reg_model, e, **{"train.label_smoothing": 0.1}),
        ]
        if arg == "paper":
            sweep.append(_run(reg_model, e, **{"model.dropout_rate": 0.3}))
    c.sweep = sweep
    return c
