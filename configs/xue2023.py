"""Xue et al. 2023, "To Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis".

T5 v1.1 encoder-decoders pre-trained with span corruption (MLM) at a FIXED token budget:
U unique tokens repeated E = budget / U times (f = 100%; E = 1, written f = 0, is the
unique baseline), across model size, UL2 vs MLM, dropout, staged dropout, DropPath, label
smoothing, MoE and ParamShare.

    python launch/submit.py --config=configs/xue2023.py:demo --root=demo_out/xue

Scales (`:arg`; grids in docs/launching.md, docs/reproducing.md):
- `demo`: `t5_tiny` on the built-in corpus, 300 steps of 16 x 128 bytes; E in {1, 8,
  32}, UL2 and dropout 0.1 at E = 32: 5 runs.
- `cpu`: Xue (d), `t5_tiny` on the built-in corpus at E in 1 ... 256, dropout, staged
  dropout and UL2 at E = 256: 12 runs. Measured: 14.1 min alone on 2 cores with their
  evaluation; test loss 2.492 (E = 1, mean of 2 seeds) -> 2.897 (E = 256); dropout 0.1
  removes 48% of that degradation, staged dropout 34%.
- `small`: `t5_small` on C4, 2^14 steps of 32 x 512 inputs; E in {1, 4, 16, 64}, UL2
  and MoE at E in {1, 64}, regularisers at E = 64: 12 runs.
- `paper`: `t5_base`/`t5_large`/`t5_xl`, 2^19 steps of 128 x 512 inputs, E = 1 ... 256;
  UL2 on T5-Base; regularisers at E = 16 and 256; MoE and ParamShare: 53 runs
  (Adafactor with the T5 defaults).
- `finetune_demo` / `finetune_small` / `finetune_paper`: that scale's (MLM) runs
  fine-tuned text-to-text (`supervised`) on a prepared task store (`copy_word`, SQuAD)
  from `{root}/<pre-training run>`, plus one from-scratch run: 5 + 1, 4 + 1, 9 + 1 runs
  (docs/finetuning.md: preparing the store, budgets, optimiser).
"""

from repeat_scaling import sweeps
from repeat_scaling.sweeps import all_repeated
from repeat_scaling.train.config import adafactor_t5, adamw, default_config, model_fields

SCALES = ("demo", "small", "paper")
CAMPAIGNS = ("cpu",)  # a CPU campaign (no fine-tuning stage)
STAGES = tuple(f"finetune_{s}" for s in SCALES)
C4 = "tfds:c4/en:3.1.0"
T5_VOCAB = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
#: The CPU campaign's epochs over the training data (E = 1: the unique baseline).
CPU_EPOCHS = (1, 4, 16, 64, 256)
TASK_STORES = {  # (store, task spec, inputs_length, targets_length)
    "demo": ("demo_out/stores/copy_word-byte", "builtin_task:copy_word", 32, 16),
    "small": ("data/stores/squad-t5spm-512-32", "squad", 512, 32),
    "paper": ("data/stores/squad-t5spm-512-32", "squad", 512, 32),
}
#: Fine-tuning stages: scale -> (steps, batch, f, E) over the task's training examples.
FINETUNE = {"demo": (330, 16, 1.0, 3), "small": (2720, 32, 0.0, 1), "paper": (2040, 128, 1.0, 3)}
DROPOUT = {"model.dropout_rate": 0.1}


def _ul2(targets_length):
    """UL2's R/X/S mixture (REFERENCE.md section 3) needs an explicit targets length (this
    suite's choice: unconfirmed)."""
    return {"data.objective": "ul2", "data.targets_length": targets_length}


def finetune_config(scale: str):
    """The fine-tuning stage of ``scale`` (small/paper: the plain MLM runs of the base model)."""
    store, _, inputs_length, targets_length = TASK_STORES[scale]
    steps, batch, fraction, epochs = FINETUNE[scale]
    c = get_config(scale)
    model = c.model.name
    c.data.store, c.data.source, c.data.objective = store, "", "supervised"
    c.data.inputs_length, c.data.targets_length = inputs_length, targets_length
    c.data.objective_options = {}
    c.data.repeated_fraction, c.data.repeated_epochs = fraction, epochs
    c.train.steps, c.train.batch_size = steps, batch
    c.train.checkpoint_every, c.train.keep, c.train.keep_period = steps // 5, 5, 0
    if scale == "demo":
        adamw(c, lr=1e-3, warmup=0, schedule="constant")
    else:
        adafactor_t5(c)
        c.train.optimizer.learning_rate, c.train.optimizer.schedule = 1e-3, "constant"
        c.train.optimizer.warmup_steps = 0
    plain = (
        None if scale == "demo" else (lambda r: sweeps.is_plain(r) and r.config.model.name == model)
    )
    c.sweep = sweeps.finetune_sweep(
        get_config(scale), select=plain, fixed={"data.objective": "supervised"}
    )
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
        sweep = [all_repeated(m, e) for e in (1, 8, 32)]
        c.sweep = sweep + [all_repeated(m, 32, **_ul2(128)), all_repeated(m, 32, **DROPOUT)]
        return c
    if arg == "cpu":
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
        staged = {**DROPOUT, "train.dropout_start_step": c.train.steps // 2}
        sweep = [all_repeated(m, e) for e in CPU_EPOCHS]
        sweep += [all_repeated(m, e, seed=1) for e in (1, worst)]
        sweep += [all_repeated(m, worst, **DROPOUT), all_repeated(m, worst, seed=1, **DROPOUT)]
        sweep += [all_repeated(m, worst, **staged)]
        sweep += [all_repeated(m, e, **_ul2(128)) for e in (1, worst)]
        c.sweep = sweep
        return c
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
        sweep = [all_repeated(m, e) for e in epochs]
        sweep += [all_repeated(m, e, **_ul2(512)) for e in (1, hi)]
        sweep += [all_repeated("t5_small_moe8", e) for e in (1, hi)]
        reg_epochs, reg_model = (hi,), m
    else:
        c.model = model_fields("t5_base")
        c.data.store = "data/stores/c4-t5spm"  # relative to the repo: a copy on every host
        c.train.steps, c.train.batch_size = 2**19, 128
        c.train.compute_dtype = "bfloat16"
        # T5-XL fits a v4-128 only with FSDP over 8 devices (a base-config key: run names
        # are unchanged); docs/launching.md: "Before you pay for a pod".
        c.mesh.ici.fsdp = 8
        c.train.checkpoint_every, c.train.keep, c.train.keep_period = 5000, 2, 20_000
        epochs = tuple(2**k for k in range(9))  # 1 ... 256: unique tokens 2^35 ... 2^27
        sweep = [all_repeated(m, e) for m in ("t5_base", "t5_large", "t5_xl") for e in epochs]
        sweep += [all_repeated("t5_base", e, **_ul2(512)) for e in epochs]
        sweep += [
            all_repeated(m, e) for m in ("t5_base_moe8", "t5_base_share") for e in (1, 16, 256)
        ]
        sweep += [all_repeated("t5_base_moe8", 256, **DROPOUT)]
        reg_epochs, reg_model = (16, 256), "t5_base"
    staged = {**DROPOUT, "train.dropout_start_step": c.train.steps // 2}
    for e in reg_epochs:
        sweep += [
            all_repeated(reg_model, e, **DROPOUT),
            all_repeated(reg_model, e, **staged),
            all_repeated(reg_model, e, **{"model.droppath_rate": 0.1}),
            all_repeated(reg_model, e, **{"train.label_smoothing": 0.1}),
        ]
        if arg == "paper":
            sweep.append(all_repeated(reg_model, e, **{"model.dropout_rate": 0.3}))
    c.sweep = sweep
    return c
