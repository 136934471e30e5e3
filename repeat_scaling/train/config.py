"""Training configuration: the schema, its defaults and up-front validation.

A training config is an ``ml_collections.ConfigDict`` built by a file under ``configs/``
(``--config=configs/x.py:arg``) starting from :func:`default_config`, and overridden on
the command line (``--config.train.steps=100``). :func:`validate` checks it *before*
anything is compiled and raises :class:`ConfigError` with one line naming the bad key,
its value and what was expected.

Units and conventions:

* ``train.batch_size`` is the GLOBAL batch in examples (rows), across all hosts; it is
  split into ``train.grad_accum`` microbatches that are accumulated inside one step.
* ``train.steps`` counts optimizer updates; checkpoints and logs are keyed by the number
  of completed updates (a checkpoint at step 100 holds the state after 100 updates, and
  the next batch it consumes is batch 100).
* ``train.steps_per_call`` (default 1): steps run by one compiled call (a ``lax.scan``
  over that many batches; bit-identical losses and parameters to one step per call on
  CPU). Calls are cut at checkpoints, evals and the end, so a value dividing
  ``checkpoint_every`` and ``eval_every`` avoids compiling the one-step function too.
  0 picks :func:`auto_steps_per_call` from the model FLOPs per step (many for tiny
  models, 1 from 32 GFLOP per step).
* ``train.peak_tflops`` is the dense peak TFLOP/s of ONE accelerator chip in the
  compute dtype (on CPU: of the whole host, since XLA:CPU devices share its cores);
  0 looks the chip up in a small table and leaves MFU null when unknown.
* ``train.compute_dtype`` ("" keeps ``model.dtype``) overrides the model's compute dtype;
  parameters stay float32.
* ``mesh.ici`` / ``mesh.dcn``: sizes of the mesh axes data/fsdp/tensor/expert within a
  slice and across slices; -1 fills the remaining devices.
* ``init_from`` (fine-tuning): a training workdir, local or ``gs://`` (its committed
  checkpoint ``init_step``, -1 = the latest) or a local Hugging Face T5 directory whose
  parameters start this run; the optimizer state, schedule and step start fresh
  ("" = random init).
* ``interventions``: a tuple of clamp specs (dicts, see
  :mod:`repeat_scaling.models.interventions`), e.g. ``({"kind": "previous_token",
  "layer": 0, "head": 1, "start_step": 0, "end_step": 500},)``, applied inside the
  compiled train step while ``start_step <= step < end_step`` (-1: forever). On the
  command line: ``--config.interventions="({'kind': 'ablate', 'layer': 0, 'head': 1},)"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from repeat_scaling import sharding
from repeat_scaling.data import repetition
from repeat_scaling.data.objectives import OBJECTIVE_ARCHS, OBJECTIVES
from repeat_scaling.errors import first_line
from repeat_scaling.models.config import DTYPES, ModelConfig
from repeat_scaling.sharding import MESH_AXES
from repeat_scaling.train import optimizers


class ConfigError(ValueError):
    """A bad training configuration (message is one line, names key and value)."""


def model_fields(name: str) -> ml_collections.ConfigDict:
    """All ModelConfig fields of the named size (``models.sizes.get(name)``) as a ConfigDict.

    Config files use it so every model field is overridable from the command line
    (``--config.model.dropout_rate=0.1``).
    """
    from repeat_scaling.models import sizes

    try:
        cfg = sizes.get(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.name={name!r} is not a known model size ({e})") from None
    d = cfg.to_dict()
    d["name"] = name
    return ml_collections.ConfigDict(d)


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may have, with defaults (``model`` left empty)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()  # filled by configs via model_fields(name)
    c.init_from = ""  # fine-tune from a run workdir or a Hugging Face T5 directory
    c.init_step = -1  # checkpoint step of init_from (a run workdir); -1: latest committed
    c.interventions = ()  # attention clamps during training (tuple of dicts)

    c.data = ml_collections.ConfigDict()
    c.data.store = ""  # prepared token store directory
    c.data.source = ""  # prepare the store from this source if it does not exist
    c.data.vocab = ""  # vocabulary spec for preparing ("byte" or a .model path)
    c.data.prepare_options = ml_collections.ConfigDict()  # extra prepare_store kwargs
    c.data.objective = "causal_lm"
    c.data.inputs_length = 0  # encoder-decoder inputs length
    c.data.targets_length = 0  # encoder-decoder targets length (0: derived)
    c.data.length = 0  # decoder-only sequence length
    c.data.noise_density = 0.15
    c.data.mean_noise_span_length = 3.0
    c.data.pack = False
    c.data.objective_options = ml_collections.ConfigDict()  # e.g. UL2 denoisers
    c.data.repeated_fraction = 0.0
    c.data.repeated_epochs = 1
    c.data.prefetch = 2

    # Evaluator settings of this experiment (keys of eval.settings.EvalSettings and the
    # evaluator's downstream_* flags), recorded in config.json; --eval_config overrides.
    c.eval = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.steps_per_call = 1  # train steps per compiled call (lax.scan); 0: auto
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep = 3
    c.train.keep_period = 0  # also keep every checkpoint whose step % keep_period == 0
    c.train.async_checkpointing = True
    c.train.z_loss = 1e-4
    c.train.label_smoothing = 0.0
    c.train.dropout_start_step = 0  # staged dropout: rates are 0 before this step
    c.train.compute_dtype = ""
    c.train.peak_tflops = 0.0
    c.train.eval_every = 0  # light in-loop held-out eval (0: off)
    c.train.eval_batches = 2
    c.train.profile_start_step = -1  # jax.profiler trace window (-1: off)
    c.train.profile_steps = 3
    c.train.progress_bar = "auto"  # auto | on | off

    o = c.train.optimizer = ml_collections.ConfigDict()
    o.name = "adafactor"
    o.learning_rate = 1.0
    o.schedule = "rsqrt"
    o.warmup_steps = 10_000
    o.decay_steps = 0  # 0: train.steps
    o.end_learning_rate_fraction = 0.0
    o.b1 = 0.9  # adamw
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.clip_norm = 0.0
    o.adafactor_decay_rate = 0.8
    o.adafactor_clipping_threshold = 1.0
    o.adafactor_multiply_by_parameter_scale = True
    o.adafactor_factored = True
    o.adafactor_momentum = 0.0  # 0: none (T5)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.ici = ml_collections.ConfigDict({a: -1 if a == "data" else 1 for a in MESH_AXES})
    c.mesh.dcn = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
    return c


def adafactor_t5(c: ml_collections.ConfigDict) -> None:
    """T5 pretraining optimiser: Adafactor, rsqrt decay, 10k warmup, lr 1.0."""
    o = c.train.optimizer
    o.name, o.learning_rate, o.schedule, o.warmup_steps = "adafactor", 1.0, "rsqrt", 10_000
    o.adafactor_momentum = 0.0


def adamw(c, lr: float, warmup: int = 0, schedule: str = "cosine", wd: float = 0.0) -> None:
    """AdamW with linear warmup then ``schedule`` decay."""
    o = c.train.optimizer
    o.name, o.learning_rate, o.warmup_steps, o.schedule, o.weight_decay = (
        "adamw",
        lr,
        warmup,
        schedule,
        wd,
    )


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def _to_dict(c: Any) -> Any:
    return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)


FREE_FORM = {"data.prepare_options", "data.objective_options", "interventions", "eval"}


def _floats(d: Any, prefix: str):
    """``(dotted key, value)`` of every float in a nested dict/list config."""
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}" if isinstance(d, dict) else f"{prefix.rstrip('.')}[{k}]"
        if isinstance(v, float):
            yield key, v
        elif isinstance(v, dict):
            yield from _floats(v, key + ".")
        elif isinstance(v, (list, tuple)):
            yield from _floats(v, key + ".")


def _check_keys(got: dict, schema: dict, prefix: str) -> None:
    for k, v in got.items():
        key = f"{prefix}{k}"
        if key == "model" or key in FREE_FORM or key == "sweep":
            continue
        if k not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key {key!r} (known keys here: {known})")
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} must be a group of keys, got {v!r}")
            _check_keys(v, schema[k], key + ".")


def model_config(config: Any):
    """The ModelConfig of a training config (``train.compute_dtype`` applied)."""
    d = dict(_to_dict(config)["model"])
    if not d:
        raise ConfigError("config has no model: set config.model = model_fields('<size name>')")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key 'model.{unknown[0]}' (ModelConfig fields: {sorted(fields)})"
        )
    dtype = config["train"]["compute_dtype"]
    if dtype:
        d["dtype"] = dtype
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def validate(config: Any, *, num_devices: int | None = None, process_count: int = 1):
    """Check a training config; return its ModelConfig. Raises ConfigError (one line).

    ``num_devices`` (when given) checks the mesh against the device count and the batch
    against the data-parallel size.
    """
    d = _to_dict(config)
    _check_keys(d, default_config().to_dict(), "")
    cfg = model_config(config)
    data, train, opt = d["data"], d["train"], d["train"]["optimizer"]

    def bad(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{key}={value!r}; expected {expected}")

    for key, value in _floats({k: v for k, v in d.items() if k != "sweep"}, ""):
        if not math.isfinite(value):
            bad(key, value, "a finite number")

    if not isinstance(d["seed"], int) or d["seed"] < 0:
        bad("seed", d["seed"], "a non-negative int")
    init_from, init_step = d.get("init_from", ""), d.get("init_step", -1)
    if not isinstance(init_from, str):
        bad("init_from", init_from, "a directory path (or '' for a random init)")
    if "://" in init_from and not init_from.startswith("gs://"):
        bad("init_from", init_from, "a local directory or a gs://BUCKET/PATH run workdir")
    if not isinstance(init_step, int) or init_step < -1:
        bad("init_step", init_step, "a checkpoint step >= 0, or -1 for the latest")
    if init_step != -1 and not init_from:
        bad("init_step", init_step, "-1 when no init_from is given")
    interventions(config, cfg)
    # -- data -------------------------------------------------------------------------
    if not data["store"]:
        bad("data.store", data["store"], "the directory of a prepared token store")
    if data["objective"] not in OBJECTIVES:
        bad("data.objective", data["objective"], f"one of {OBJECTIVES}")
    archs = OBJECTIVE_ARCHS[data["objective"]]
    if cfg.arch not in archs:
        raise ConfigError(
            f"data.objective={data['objective']!r} does not fit model.arch={cfg.arch!r}; "
            f"expected a model with arch in {archs}"
        )
    if cfg.arch == "encoder_decoder":
        if data["inputs_length"] <= 0:
            bad("data.inputs_length", data["inputs_length"], "> 0 for an encoder_decoder model")
        if data["objective"] != "span_corruption" and data["targets_length"] <= 0:
            bad("data.targets_length", data["targets_length"], f"> 0 for {data['objective']}")
    elif data["length"] <= 0:
        bad("data.length", data["length"], "> 0 for a decoder_only model")
    f, epochs = data["repeated_fraction"], data["repeated_epochs"]
    if not repetition.fraction_in_range(f):
        bad("data.repeated_fraction", f, "a fraction in [0, 1]")
    if not isinstance(epochs, int) or not repetition.epochs_in_range(epochs):
        bad("data.repeated_epochs", epochs, "an int >= 1")
    if repetition.effective_epochs(f, epochs) != epochs:
        bad("data.repeated_epochs", data["repeated_epochs"], "1 when data.repeated_fraction=0")
    # -- train ------------------------------------------------------------------------
    for key in ("steps", "batch_size", "grad_accum", "log_every", "keep", "eval_batches"):
        if not isinstance(train[key], int) or train[key] < 1:
            bad(f"train.{key}", train[key], "an int >= 1")
    for key in ("checkpoint_every", "keep_period", "dropout_start_step", "eval_every"):
        if not isinstance(train[key], int) or train[key] < 0:
            bad(f"train.{key}", train[key], "an int >= 0")
    if not isinstance(train["steps_per_call"], int) or train["steps_per_call"] < 0:
        bad("train.steps_per_call", train["steps_per_call"], "an int >= 0 (0: auto)")
    if train["batch_size"] % train["grad_accum"]:
        bad(
            "train.grad_accum",
            train["grad_accum"],
            f"a divisor of train.batch_size={train['batch_size']}",
        )
    if train["batch_size"] % process_count:
        bad(
            "train.batch_size",
            train["batch_size"],
            f"a multiple of the process count {process_count}",
        )
    if train["z_loss"] < 0:
        bad("train.z_loss", train["z_loss"], ">= 0")
    if not 0.0 <= train["label_smoothing"] < 1.0:
        bad("train.label_smoothing", train["label_smoothing"], "in [0, 1)")
    if train["compute_dtype"] not in ("", *DTYPES):
        expected = "'', " + " or ".join(repr(t) for t in DTYPES)
        bad("train.compute_dtype", train["compute_dtype"], expected)
    if train["peak_tflops"] < 0:
        bad("train.peak_tflops", train["peak_tflops"], ">= 0 (0: look the chip up)")
    if train["progress_bar"] not in ("auto", "on", "off"):
        bad("train.progress_bar", train["progress_bar"], "'auto', 'on' or 'off'")
    # -- optimizer --------------------------------------------------------------------
    if opt["name"] not in optimizers.OPTIMIZERS:
        bad("train.optimizer.name", opt["name"], f"one of {optimizers.OPTIMIZERS}")
    if opt["schedule"] not in optimizers.SCHEDULES:
        bad("train.optimizer.schedule", opt["schedule"], f"one of {optimizers.SCHEDULES}")
    if not opt["learning_rate"] > 0:
        bad("train.optimizer.learning_rate", opt["learning_rate"], "> 0")
    if opt["warmup_steps"] < 0:
        bad("train.optimizer.warmup_steps", opt["warmup_steps"], ">= 0")
    for key in ("weight_decay", "clip_norm", "end_learning_rate_fraction"):
        if opt[key] < 0:
            bad(f"train.optimizer.{key}", opt[key], ">= 0")
    if opt["name"] == "adamw" and not (0 <= opt["b1"] < 1 and 0 <= opt["b2"] < 1):
        bad("train.optimizer.b1/b2", (opt["b1"], opt["b2"]), "betas in [0, 1)")
    # -- mesh -------------------------------------------------------------------------
    ici, dcn = d["mesh"]["ici"], d["mesh"]["dcn"]
    try:
        sharding.check_mesh_axes(ici, "mesh.ici", fill=True)
        sharding.check_mesh_axes(dcn, "mesh.dcn", fill=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if num_devices is not None:
        sizes = mesh_shape(ici, dcn, num_devices)
        dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        micro = train["batch_size"] // train["grad_accum"]
        if micro % dp:
            raise ConfigError(
                f"train.batch_size={train['batch_size']} / train.grad_accum={train['grad_accum']} "
                f"= {micro} is not divisible by the data-parallel size {dp} "
                f"(mesh data*fsdp*expert = {sizes['data']}*{sizes['fsdp']}*{sizes['expert']})"
            )
    return cfg


#: ``train.steps_per_call=0`` aims one compiled call at about this many training FLOPs.
AUTO_CALL_FLOPS = 32e9
#: ... and runs at most this many steps per call.
MAX_AUTO_STEPS_PER_CALL = 16


def auto_steps_per_call(train_flops_per_step: float) -> int:
    """Steps per compiled call for ``train.steps_per_call=0`` (1 from 32 GFLOP/step up)."""
    n = int(AUTO_CALL_FLOPS // max(float(train_flops_per_step), 1.0))
    return max(1, min(MAX_AUTO_STEPS_PER_CALL, n))


def steps_per_call(config: Any, train_flops_per_step: float) -> int:
    """``train.steps_per_call`` of a validated config, resolving 0 (auto)."""
    n = int(config["train"]["steps_per_call"])
    return n or auto_steps_per_call(train_flops_per_step)


def interventions(config: Any, model_cfg: Any) -> tuple:
    """The parsed attention clamps of ``config.interventions`` (ConfigError, one line).

    Parsing is :func:`repeat_scaling.models.interventions.parse`; ``()`` when none.
    """
    specs = _to_dict(config).get("interventions") or ()
    if isinstance(specs, dict) or not isinstance(specs, (list, tuple)):
        raise ConfigError(
            f"interventions={specs!r}; expected a tuple of dicts like "
            "({'kind': 'ablate', 'layer': 0, 'head': 1},)"
        )
    if not specs:
        return ()
    from repeat_scaling.models import interventions as interventions_lib

    specs = [_to_dict(s) if isinstance(s, ml_collections.ConfigDict) else s for s in specs]
    try:
        return tuple(interventions_lib.parse(specs, model_cfg))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(first_line(e)) from None


def mesh_shape(ici: dict, dcn: dict, num_devices: int) -> dict[str, int]:
    """Total size of each mesh axis (ici * dcn) on ``num_devices`` devices
    (``sharding.resolve_mesh``); ConfigError (one line) when the mesh does not fit."""
    try:
        ici_shape, dcn_shape = sharding.resolve_mesh(
            ici, dcn, num_devices, ("mesh.ici", "mesh.dcn")
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {a: i * n for a, i, n in zip(MESH_AXES, ici_shape, dcn_shape, strict=True)}
