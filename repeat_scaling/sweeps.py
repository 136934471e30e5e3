"""Expand an experiment config's sweep into named runs.

A config file under `configs/` defines one base run and, optionally, `config.sweep`:
a list of flat dicts of dotted overrides, e.g.

    {"model.name": "d25m", "data.repeated_fraction": 0.1,
     "data.repeated_epochs": 100, "seed": 0}

Every entry becomes one `Run` with a readable, stable name built only from the
resolved config of that run, the entry's own keys and the command line's overrides that
change what is trained (`expand(named=...)`; never from the other entries, so adding
points to a sweep never renames existing runs):

    <model>_f<repeated fraction in %>_e<repeated epochs>_s<seed>[_<tag><value>...]

e.g. `d25m_f10_e100_s0`, `t5_base_f100_e256_s0_ul2`, `d25m_f0_e1_s0_do0p1` (the model
name keeps its underscores; other components use none).
Fine-tuning stages (`init_from`, see the trainer) name the run they start from:
`init_from="{root}/d25m_f10_e100_s0"` becomes the tag `ft_d25m_f10_e100_s0`, and
`{root}` in any string value is replaced by this sweep's root, so a stage's entries
point at the pre-training runs of the same root.
Config files build their entries with `point`, `all_repeated` and `grid`, and a
fine-tuning stage's sweep with `finetune_sweep`.
Decimal points become `p` (`f0p5` = 0.5 %), so names are safe as directory names,
GCS paths and (after `_` -> `-`) Cloud TPU node names. Other swept keys get a short tag
(`TAGS`, else the key's last component without underscores). Two entries that would
get the same name are an error, as is an entry naming a key the config does not have.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

# Keys that always make up the start of a run name (read from the resolved config).
MODEL_KEY = "model.name"
FRACTION_KEY = "data.repeated_fraction"
EPOCHS_KEY = "data.repeated_epochs"
SEED_KEY = "seed"
CORE_KEYS = (MODEL_KEY, FRACTION_KEY, EPOCHS_KEY, SEED_KEY)

# Short tags for other swept keys. A tag of "" means "the value alone" (e.g. `ul2`).
# Keys in UNNAMED never appear in names (they follow from a named key, e.g. the
# targets length UL2 needs); entries differing only in them are still a collision.
TAGS = {
    "data.objective": "",
    "model.dropout_rate": "do",
    "train.dropout_start_step": "from",
    "model.droppath_rate": "dp",
    "model.share_layers": "share",
    "model.num_experts": "x",
    "train.label_smoothing": "ls",
    "train.optimizer.learning_rate": "lr",
    "train.weight_decay": "wd",
    "train.steps": "steps",
    "train.batch_size": "b",
    "data.source": "",
    "init_step": "at",
}
# `init_from` (a path) is tagged by the last component of the path: `ft_<run name>`.
INIT_FROM_KEY = "init_from"
# `interventions` (attention clamps) is tagged `noclamp` or `clamp_<kind>l<layer>h<head>`.
INTERVENTIONS_KEY = "interventions"
ROOT_TEMPLATE = "{root}"
UNNAMED = {"data.targets_length", "model.vocab_size"}


class SweepError(ValueError):
    """A sweep that cannot be expanded (unknown key, bad value, name collision)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep.

    Attributes:
      name: stable readable name, also the last component of `workdir`.
      overrides: the sweep entry (dotted key -> value), in the entry's order.
      config: the resolved config of this run (base + overrides, no `sweep`).
      workdir: `<root>/<name>` (a local path or a gs:// URL).
      flags: the overrides passed to the trainer: the entry with `model.name` expanded
        into every model field that changes (see `expand_model_name`).
    """

    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict
    workdir: str
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_steps(self) -> int | None:
        """`train.steps` of the resolved config (None when the config has none)."""
        value = get_dotted(self.config, "train.steps", None)
        return int(value) if value is not None else None

    def override_flags(self) -> list[str]:
        """The sweep entry as absl `config_flags` overrides: `--config.<key>=<value>`."""
        return [f"--config.{key}={format_flag_value(v)}" for key, v in self.flags.items()]


def format_flag_value(value: Any) -> str:
    """Formats a Python value the way `config_flags` parses it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    if value is None:
        raise SweepError("sweep values cannot be None (config_flags cannot parse None)")
    return str(value)


def format_number(value: float) -> str:
    """A number as a name component: 10 -> '10', 0.5 -> '0p5', 1e-05 -> '1em05'."""
    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        text = str(int(value))
    else:
        text = f"{round(value, 8):g}"
    return text.replace(".", "p").replace("-", "m").replace("+", "")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return format_number(value)
    text = re.sub(r"[^a-z0-9]+", "", str(value).lower())
    if not text:
        raise SweepError(f"sweep value {value!r} gives an empty name component")
    return text


def interventions_tag(value: Any) -> str:
    """``noclamp`` for no clamps, else ``clamp_<kind>l<layer>h<head>[s<start>][e<end>]...``."""
    clamps = list(value or ())
    if not clamps:
        return "noclamp"
    parts = []
    for clamp in clamps:
        get = clamp.get if hasattr(clamp, "get") else (lambda k, d=None, c=clamp: getattr(c, k, d))
        kind = re.sub(r"[^a-z0-9]+", "", str(get("kind", "")).lower())
        part = f"{kind}l{get('layer', 0)}h{get('head', 0)}"
        if get("start_step", 0):
            part += f"s{get('start_step')}"
        if get("end_step", -1) not in (-1, None):
            part += f"e{get('end_step')}"
        parts.append(part)
    return "clamp_" + "_".join(parts)


def tag_for(key: str, value: Any) -> str:
    """The name component of one non-core swept key, e.g. ('model.dropout_rate', 0.1)."""
    if key == INTERVENTIONS_KEY:
        return interventions_tag(value)
    if key == INIT_FROM_KEY and isinstance(value, str) and value:
        source = posixpath.basename(value.rstrip("/"))
        text = re.sub(r"[^a-z0-9_]+", "", source.lower())
        if not text:
            raise SweepError(f"init_from={value!r} gives an empty name component")
        return f"ft_{text}"
    prefix = TAGS.get(key)
    if prefix is None:
        prefix = key.rsplit(".", 1)[-1].replace("_", "")
    if isinstance(value, bool) and prefix:
        return prefix if value else f"no{prefix}"
    return f"{prefix}{_format_value(value)}"


def get_dotted(config: ml_collections.ConfigDict, key: str, default: Any = KeyError) -> Any:
    """`config.a.b.c` for key 'a.b.c'; `default` (or KeyError) when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, ml_collections.ConfigDict | dict) and part in node:
            node = node[part]
        else:
            if default is KeyError:
                raise KeyError(key)
            return default
    return node


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str = "override"
) -> ml_collections.ConfigDict:
    """A copy of `config` (without `sweep`) with dotted `overrides` applied.

    Raises SweepError naming the key when it does not exist in the config or the value
    has the wrong type.
    """
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        if "sweep" in resolved:
            del resolved["sweep"]
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key == "sweep":
            raise SweepError(f"{where}: bad key {key!r}; expected a dotted config key")
        *parents, leaf = key.split(".")
        node: Any = resolved
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise SweepError(
                    f"{where}: unknown key {key!r} (no {'.'.join(parents[: i + 1])!r} "
                    "in the config)"
                )
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise SweepError(f"{where}: unknown key {key!r}; the config has no such field")
        try:
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            raise SweepError(f"{where}: bad value {value!r} for {key!r}: {e}") from None
    return resolved


def default_model_fields(name: str) -> dict[str, Any] | None:
    """All fields of the named model size, from the trainer's `model_fields` helper.

    None when the trainer package is not importable (then `model.name` is passed on
    as a plain override).
    """
    try:
        from repeat_scaling.train.config import model_fields
    except ImportError:
        return None
    try:
        return model_fields(name).to_dict()
    except ImportError:
        return None
    except ValueError as e:
        raise SweepError(f"bad model.name={name!r}: {e}") from None


def expand_model_name(
    config: ml_collections.ConfigDict, entry: dict[str, Any], model_fields=default_model_fields
) -> dict[str, Any]:
    """The sweep entry with `model.name` expanded into the model fields it changes.

    Config files build `config.model` from a named size (all fields spelled out, so
    each is overridable), so changing `model.name` alone would keep the old size's
    shape. A sweep entry `{"model.name": "d100m"}` therefore means: the fields of size
    `d100m`, plus whatever the base config changed relative to its own size (e.g.
    dropout or dtype), plus the entry's other `model.*` keys. Every model field that
    then differs from the base config becomes an explicit override, after `model.name`.
    """
    new_name = entry.get(MODEL_KEY)
    base_model = get_dotted(config, "model", None)
    if new_name is None or not isinstance(base_model, ml_collections.ConfigDict):
        return dict(entry)
    base_name = base_model.get("name", None)
    new_fields = model_fields(new_name)
    old_fields = model_fields(base_name) if base_name is not None else None
    if new_fields is None or old_fields is None:
        return dict(entry)
    base = base_model.to_dict()
    customised = {k: v for k, v in base.items() if k in old_fields and old_fields[k] != v}
    target = {**new_fields, **customised, "name": new_name}
    flags: dict[str, Any] = {}
    for key, value in entry.items():
        flags[key] = value
        if key == MODEL_KEY:
            for field, v in target.items():
                dotted = f"model.{field}"
                if field != "name" and dotted not in entry and base.get(field) != v:
                    flags[dotted] = v
    return flags


def run_name(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> str:
    """The stable name of the run with resolved `config` and sweep entry `overrides`."""
    model = get_dotted(config, MODEL_KEY, None)
    model_part = re.sub(r"[^a-z0-9_]+", "", str(model).lower()) if model is not None else ""
    parts = [model_part or "run"]
    fraction = get_dotted(config, FRACTION_KEY, None)
    if fraction is not None:
        parts.append("f" + format_number(round(float(fraction) * 100, 6)))
    epochs = get_dotted(config, EPOCHS_KEY, None)
    if epochs is not None:
        parts.append("e" + format_number(epochs))
    seed = get_dotted(config, SEED_KEY, None)
    if seed is not None:
        parts.append("s" + format_number(seed))
    for key, value in overrides.items():
        if key not in CORE_KEYS and key not in UNNAMED:
            parts.append(tag_for(key, value))
    return "_".join(parts)


def sweep_entries(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The config's sweep as a list of dicts; a config without a sweep is one run."""
    sweep = config.get("sweep", None)
    if sweep is None:
        return [{}]
    if not isinstance(sweep, list | tuple) or not sweep:
        raise SweepError(f"config.sweep must be a non-empty list of dicts, got {sweep!r}")
    entries = []
    for i, entry in enumerate(sweep):
        if isinstance(entry, ml_collections.ConfigDict):
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise SweepError(f"sweep entry {i}: expected a dict of overrides, got {entry!r}")
        entries.append(dict(entry))
    return entries


def expand(
    config: ml_collections.ConfigDict,
    root: str,
    only: str | Sequence[str] | None = None,
    model_fields=default_model_fields,
    named: dict[str, Any] | None = None,
) -> list[Run]:
    """Expands `config.sweep` into runs under `root`, filtered by `only` (glob(s)).

    `named`: overrides already applied to `config` (the command line's
    `--config.key=value`) that every run's name shows after its own keys, except those
    that may change on resume (`train.record.is_resumable`: steps, cadence, paths,
    evaluation, mesh), so that sweeps of one config file that train different things
    never share a workdir.

    `only` may be one glob, a comma-separated list of globs, or a list of globs; a run
    is kept when its name matches any of them. Names are checked for collisions over
    the whole sweep before filtering. `model_fields(name) -> dict | None` gives a
    named model size's fields (see `expand_model_name`).
    """
    from repeat_scaling.train.record import is_resumable

    extra = {k: v for k, v in (named or {}).items() if not is_resumable(k)}
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(sweep_entries(config)):
        entry = {k: resolve_root(v, root) for k, v in entry.items()}
        flags = expand_model_name(config, entry, model_fields)
        resolved = apply_overrides(config, flags, where=f"sweep entry {i}")
        name = run_name(resolved, {**entry, **{k: v for k, v in extra.items() if k not in entry}})
        if name in seen:
            raise SweepError(
                f"sweep entries {seen[name]} and {i} both get the run name {name!r}; "
                "make them differ in a named key"
            )
        seen[name] = i
        workdir = posixpath.join(root.rstrip("/"), name)
        runs.append(Run(name, entry, resolved, workdir, flags))
    if only:
        globs = _globs(only)
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in globs)]
        if not runs:
            raise SweepError(f"--only={','.join(globs)!r} matches no run of this sweep")
    return runs


def point(model: str, fraction: float, epochs: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """One sweep entry: the core keys (model, repeated fraction, epochs, seed), then
    ``extra`` (dotted keys, e.g. ``**{"model.dropout_rate": 0.1}``), in that order."""
    return {MODEL_KEY: model, FRACTION_KEY: fraction, EPOCHS_KEY: epochs, SEED_KEY: seed, **extra}


def all_repeated(model: str, epochs: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A :func:`point` with every token from the repeated subset (f = 1) seen ``epochs``
    times; ``epochs=1`` is the unique baseline, written f = 0."""
    return point(model, 0.0 if epochs == 1 else 1.0, epochs, seed, **extra)


def grid(
    models: Iterable[str],
    fractions: Iterable[float],
    epochs: Iterable[int],
    seeds: Iterable[int] = (0,),
    baselines: bool = True,
    per_model: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per seed and model: the f = 0 baseline (E = 1, unless ``baselines`` is False),
    then a :func:`point` for every (f, E); ``per_model[model]`` adds keys to its entries."""
    models, fractions, epochs = list(models), list(fractions), list(epochs)
    sweep = []
    for seed in seeds:
        for m in models:
            own = (per_model or {}).get(m, {})
            if baselines:
                sweep.append(point(m, 0.0, 1, seed, **own))
            sweep += [point(m, f, e, seed, **own) for f in fractions for e in epochs]
    return sweep


def is_plain(run: Run) -> bool:
    """Whether ``run``'s sweep entry sets only the core keys (no objective, regulariser,
    ... of its own)."""
    return set(run.overrides) <= set(CORE_KEYS)


def finetune_sweep(
    pretraining: ml_collections.ConfigDict,
    select: Callable[[Run], bool] | None = None,
    fixed: dict[str, Any] | None = None,
    per_model: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A fine-tuning stage's sweep: one from-scratch run per model, then every run of the
    pre-training sweep ``pretraining`` that ``select`` keeps (default: all) fine-tuned.

    Each entry is ``{"model.name": <the source's model>, **fixed, "seed": 0,
    **per_model.get(<model>, {})}``; a fine-tuned one has the source's seed and
    ``init_from``: its workdir expanded under :data:`ROOT_TEMPLATE`
    (``{root}/<pre-training run name>``), which :func:`expand` resolves to the stage's root.
    """
    sources = [r for r in expand(pretraining, ROOT_TEMPLATE) if select is None or select(r)]

    def entry(run: Run, **extra: Any) -> dict[str, Any]:
        model = run.config.model.name
        own = (per_model or {}).get(model, {})
        return {MODEL_KEY: model, **(fixed or {}), SEED_KEY: 0, **own, **extra}

    first: dict[str, Run] = {}  # one from-scratch run per model
    for r in sources:
        first.setdefault(r.config.model.name, r)
    sweep = [entry(r) for r in first.values()]
    sweep += [entry(r, **{SEED_KEY: r.config.seed, INIT_FROM_KEY: r.workdir}) for r in sources]
    return sweep


def resolve_root(value: Any, root: str) -> Any:
    """``value`` with ``{root}`` replaced by the sweep root (strings only)."""
    if isinstance(value, str) and ROOT_TEMPLATE in value:
        return value.replace(ROOT_TEMPLATE, root.rstrip("/") or "/")
    return value


def _globs(only: str | Iterable[str]) -> list[str]:
    items = only.split(",") if isinstance(only, str) else list(only)
    return [g.strip() for g in items if g.strip()]
