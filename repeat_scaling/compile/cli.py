"""The command line: ``python -m repeat_scaling.compile --config=... --topology=...``."""

from __future__ import annotations

import os
import sys
from typing import Any

from repeat_scaling import cli, config_files
from repeat_scaling.compile import CompileCheckError
from repeat_scaling.compile.check import check
from repeat_scaling.compile.report import format_report, json_line
from repeat_scaling.compile.topologies import TOPOLOGIES


def apply_model_name(config: Any, overrides: dict[str, Any], base: Any = None) -> Any:
    """``--config.model.name=X`` means the fields of size X, as in a sweep entry
    (``repeat_scaling.sweeps.expand_model_name``): the new size's fields, plus what the config
    file (``base``) changed relative to its own size (e.g. ``remat_policy``), plus the
    other ``--config.model.*`` overrides."""
    from repeat_scaling.train import config as config_lib

    new = overrides.get("model.name")
    if new is None:
        return config
    explicit = {k.split(".", 1)[1] for k in overrides if k.startswith("model.")}
    try:
        fields = config_lib.model_fields(str(new)).to_dict()
        customised = {}
        if base is not None and base.model.get("name"):
            old = config_lib.model_fields(str(base.model.name)).to_dict()
            customised = {k: v for k, v in base.model.items() if k in old and old[k] != v}
    except config_lib.ConfigError as e:
        raise CompileCheckError(str(e)) from None
    for field, value in {**fields, **customised}.items():
        if field not in explicit:
            config.model[field] = value
    config.model.name = str(new)
    return config


def main(argv: list[str]) -> None:
    from absl import flags

    flags_ = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE to override the config")
    if flags_.config is None:
        cli.fail("--config is required (e.g. --config=configs/xue2023.py:paper)")
    if not flags_.topology:
        cli.fail(f"--topology is required; known accelerator types: {', '.join(TOPOLOGIES)}")
    from ml_collections import config_flags

    try:
        overrides = config_flags.get_override_values(flags_["config"])
        base = None
        if "model.name" in overrides:
            base = config_files.load(flags_["config"].serialize().partition("=")[2])
        config = apply_model_name(flags_.config, overrides, base)
        report = check(config, flags_.topology, flags_.num_slices, flags_.eval_topology)
    except CompileCheckError as e:
        cli.fail(str(e))
    print(format_report(report), flush=True)
    print(json_line(report), flush=True)
    sys.exit(0 if report["fits"] else 2)


def run() -> None:
    """Entry point: ``python -m repeat_scaling.compile``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jax's own backend: this host's CPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # libtpu's start-up chatter
    from absl import app, flags
    from ml_collections import config_flags

    from repeat_scaling import cli

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/x.py[:arg]).")
    flags.DEFINE_string("topology", "", "accelerator type, e.g. v4-128, v5litepod-256, v5p-512")
    flags.DEFINE_integer("num_slices", 1, "slices of --topology (multi-slice over DCN)")
    flags.DEFINE_string(
        "eval_topology",
        "default",
        "the evaluator's host type ('none': skip; default: v5litepod-1, or h100x1 for GPUs)",
    )
    app.run(main, flags_parser=cli.parse_flags)
