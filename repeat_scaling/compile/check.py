"""The check of one run (its programs compiled, read into a report dict) and of many
runs (one compile per distinct program, reports cached on disk)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from repeat_scaling.compile import CompileCheckError
from repeat_scaling.compile.analysis import flops_report, memory_report
from repeat_scaling.compile.devices import topology_devices
from repeat_scaling.compile.programs import (
    compile_train,
    eval_programs,
    resolve_num_slices,
    train_setup,
)
from repeat_scaling.compile.topologies import DEFAULT_EVAL_TOPOLOGY, get_topology


def check(
    config: Any,
    topology: str,
    num_slices: int = 1,
    eval_topology: str | None = None,
) -> dict[str, Any]:
    """Compile ``config`` (a resolved training config) for ``topology``; the report dict.

    ``eval_topology``: accelerator type of the evaluator's host (None / "none": skip;
    "default": DEFAULT_EVAL_TOPOLOGY of the platform).
    """
    topo = get_topology(topology)
    eval_topo = None
    if eval_topology == "default":
        eval_topology = DEFAULT_EVAL_TOPOLOGY[topo.generation.platform]
    if eval_topology and str(eval_topology).lower() != "none":
        eval_topo = get_topology(eval_topology)
        if eval_topo.hosts > 1:
            raise CompileCheckError(
                f"--eval_topology={eval_topology}: the evaluator runs on one host; pick a "
                f"single-host type (e.g. v5litepod-1, v5litepod-8, v4-8)"
            )
    config = resolve_num_slices(config, num_slices)
    devices = topology_devices(topo, num_slices)
    setup = train_setup(config, devices, hosts=topo.hosts * num_slices)
    train = compile_train(setup)
    mesh = {a: int(s) for a, s in setup.mesh.shape.items()}
    report: dict[str, Any] = {
        "model": setup.model_cfg.name,
        "topology": {**topo.describe(), "num_slices": num_slices, "devices": len(devices)},
        "mesh": mesh,
        "mesh_dcn": {a: int(n) for a, n in dict(config.mesh.dcn).items()},
        "batch_size": int(config.train.batch_size),
        "grad_accum": int(config.train.grad_accum),
        "steps_per_call": setup.steps_per_call,
        "feature_shapes": {k: list(v.shape) for k, v in setup.batch.items()},
        "hbm": memory_report(train, topo),
        "compile_s": round(train.compile_s, 2),
    }
    if train.compiled is not None:
        report.update(flops_report(train, setup, len(devices), topo.generation.peak_bf16_tflops))
    else:
        report["flops"] = {"model_per_step": setup.model_flops_per_step}
    report["fits"] = bool(report["hbm"]["fits"])
    if eval_topo is not None:
        edevs = topology_devices(eval_topo, 1)
        progs = eval_programs(config, setup.model_cfg, edevs)
        mems = {p.name: memory_report(p, eval_topo) for p in progs}
        worst = max(mems.values(), key=lambda m: m["total"] if m["total"] is not None else 1 << 62)
        report["eval"] = {
            "topology": eval_topo.accelerator_type,
            "devices": len(edevs),
            "programs": mems,
            "hbm": worst,
            "fits": all(m["fits"] for m in mems.values()),
            "compile_s": round(sum(p.compile_s for p in progs), 2),
        }
        report["fits"] = report["fits"] and report["eval"]["fits"]
    return report


# ----------------------------------------------------------------------------------------
# Many runs (launch/submit.py): one compile per distinct program.
# ----------------------------------------------------------------------------------------
#: Config keys that never change the compiled programs (data selection, bookkeeping,
#: schedule constants): runs differing only in these share one compile.
PROGRAM_NEUTRAL = (
    "seed", "init_from", "init_step", "data.store", "data.source", "data.vocab",
    "data.prepare_options", "data.repeated_fraction", "data.repeated_epochs", "data.prefetch",
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep",
    "train.keep_period", "train.async_checkpointing", "train.peak_tflops",
    "train.profile_start_step", "train.profile_steps", "train.progress_bar",
    "train.dropout_start_step", "train.optimizer.learning_rate",
    "train.optimizer.warmup_steps", "train.optimizer.decay_steps",
    "train.optimizer.end_learning_rate_fraction", "model.name",
)  # fmt: skip


def program_key(config: Any) -> str:
    """A key equal for configs that compile to the same programs."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d.pop("sweep", None)
    for key in PROGRAM_NEUTRAL:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(d, sort_keys=True, default=str)


def default_cache_dir() -> str:
    """Where ``check_runs`` keeps reports: $REPEAT_SCALING_COMPILE_CACHE ('' = no cache),
    else ``workdir_io.user_cache_dir()/compile_check`` (``~/.cache/repeat_scaling/...``)."""
    from repeat_scaling import workdir_io

    default = str(workdir_io.user_cache_dir() / "compile_check")
    return os.environ.get("REPEAT_SCALING_COMPILE_CACHE", default)


def _code_fingerprint() -> str:
    """Versions of jax, jaxlib, libtpu and a hash of this package's sources: a cached
    report is reused only while all of them are unchanged."""
    import hashlib
    import pathlib
    from importlib import metadata

    h = hashlib.sha256()
    for pkg in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=;".encode())
    root = pathlib.Path(__file__).resolve().parent.parent  # the repeat_scaling package
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def check_runs(
    runs: Iterable[tuple[str, Any]],
    topology: str,
    num_slices: int = 1,
    eval_topology: str | None = None,
    log: Callable[[str], None] = print,
    cache_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Check every ``(name, config)``; configs with the same program compile once.

    Reports are kept in ``cache_dir`` (default :func:`default_cache_dir`; '' = none),
    keyed by the program, the topology and the code (:func:`_code_fingerprint`), so a
    re-submitted sweep does not compile again. Returns run name -> report.
    """
    import hashlib

    runs = list(runs)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    fingerprint = _code_fingerprint() if cache_dir else ""
    by_key: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    distinct = len({program_key(c) for _, c in runs})
    log(f"# compile check: {len(runs)} run(s), {distinct} distinct program(s) for {topology}"
        + (f" x {num_slices} slices" if num_slices > 1 else ""))  # fmt: skip
    for name, config in runs:
        key = program_key(config)
        if key not in by_key:
            spec = json.dumps([key, topology, num_slices, eval_topology, fingerprint])
            path = ""
            if cache_dir:
                digest = hashlib.sha256(spec.encode()).hexdigest()[:32]
                path = os.path.join(cache_dir, f"{digest}.json")
            if path and os.path.isfile(path):
                with open(path) as f:
                    by_key[key] = json.load(f)
                log(f"#   {name}: cached ({path})")
            else:
                t0 = time.perf_counter()
                by_key[key] = check(config, topology, num_slices, eval_topology)
                log(f"#   {name}: compiled in {time.perf_counter() - t0:.0f} s")
                if path:
                    os.makedirs(cache_dir, exist_ok=True)
                    with open(path + ".tmp", "w") as f:
                        json.dump(by_key[key], f, default=str)
                    os.replace(path + ".tmp", path)
        out[name] = by_key[key]
    return out
