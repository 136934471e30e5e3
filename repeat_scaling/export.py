"""Export a run's checkpoint: ``python -m repeat_scaling.export --workdir=RUN --out=DIR``.

Flags: ``--workdir=RUN`` (a training workdir, local or gs://), ``--step=N`` (a committed
checkpoint; default the latest), ``--format=hf|t5x`` (default ``hf``), ``--out=DIR`` (a
new or empty local directory).

* ``hf``: a Hugging Face ``T5ForConditionalGeneration`` directory (``config.json`` +
  ``model.safetensors``, :func:`repeat_scaling.models.convert.export_hf_t5`) with the
  run's REAL vocabulary size, read from the run's token store (``data.store`` of its
  ``config.json``, found as ``train.init_from.source_store`` finds it): the padded rows
  of the embedding and output projection are dropped (byte vocabulary: 359 rows, not
  384). ``convert.load_hf_t5`` and ``--config.init_from=DIR`` read it back (padding again).
* ``t5x``: a T5X checkpoint directory (orbax PyTree of ``target`` params with T5X names,
  plus ``state/step``; :func:`repeat_scaling.models.convert.export_t5x`), every embedding
  row kept as T5X does; ``convert.load_t5x_checkpoint(DIR, cfg)`` reads it back.

Only dense encoder-decoder (T5 v1.1) models convert; a decoder-only run is a one-line
error. Beside the weights, ``export.json`` records the source workdir, the step, the
vocabulary (the store's ``VocabInfo``: for SentencePiece, the ``.model`` to tokenize
with) and the model config. Bad input is one line ``error: ...`` and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from repeat_scaling import cli, run_files
from repeat_scaling.errors import first_line

FORMATS = ("hf", "t5x")


class ExportError(ValueError):
    """Bad input to the export (one-line message)."""


def run_config(workdir: Any) -> dict[str, Any]:
    """The run's ``config.json`` with its resume log applied (ExportError if absent)."""
    from repeat_scaling.train import record

    path = workdir / run_files.CONFIG
    config = run_files.read_json(path)
    if config is None:
        raise ExportError(
            f"--workdir={workdir} is not a training workdir ({path} is missing or unreadable)"
        )
    return record.effective_config(config, record.read_resume_log(workdir))


def run_vocab(workdir: Any, config: dict[str, Any]):
    """The :class:`VocabInfo` of the run's token store (ExportError when unreadable)."""
    from repeat_scaling.data.store import StoreError, TokenStore
    from repeat_scaling.train.init_from import source_store

    store = (config.get("data") or {}).get("store")
    path, why = source_store(workdir, store)
    if path is None:
        raise ExportError(f"--workdir={workdir}: the vocabulary size is unknown: {why}")
    try:
        return TokenStore(str(path)).vocab
    except (StoreError, KeyError, ValueError, OSError) as e:
        raise ExportError(
            f"--workdir={workdir}: store {path} is unreadable ({first_line(e)})"
        ) from None


def export(workdir: str, out: str, fmt: str = "hf", step: int | None = None) -> dict[str, Any]:
    """Export checkpoint ``step`` (None: the latest committed) of ``workdir`` to ``out``.

    Returns the record written to ``out/export.json``. Raises :class:`ExportError`.
    """
    from repeat_scaling import workdir_io
    from repeat_scaling.models import convert
    from repeat_scaling.models.config import ModelConfig
    from repeat_scaling.train import checkpointing

    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        out_dir = workdir_io.require_local(out, "--out")
        wd = workdir_io.check_workdir(workdir)
    except workdir_io.WorkdirError as e:
        raise ExportError(str(e)) from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"--out={out} exists and is not an empty directory; expected a new one")
    if not wd.is_dir():
        raise ExportError(f"--workdir={workdir} does not exist; expected a training workdir")
    config = run_config(wd)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(
            f"--workdir={workdir}: config.json has no usable model block ({e})"
        ) from None
    try:
        convert._check_convertible(model_cfg)
    except convert.ConversionError as e:
        raise ExportError(f"--workdir={workdir}: {e}") from None
    vocab = run_vocab(wd, config)
    steps = checkpointing.committed_steps(wd)
    if not steps:
        raise ExportError(f"--workdir={workdir} has no committed checkpoint")
    if step is not None and step not in steps:
        raise ExportError(f"--step={step} is not a committed checkpoint of {workdir}: {steps}")
    try:
        model, _, step = checkpointing.restore_params(
            wd, steps[-1] if step is None else step, model_config=model_cfg
        )
        if fmt == "hf":
            convert.export_hf_t5(model_cfg, model, out_dir, vocab_size=vocab.vocab_size)
        else:
            convert.export_t5x(model_cfg, model, out_dir, step)
    except (checkpointing.CheckpointError, convert.ConversionError) as e:
        raise ExportError(first_line(e)) from None
    rec = {
        "format": fmt,
        "workdir": str(wd),
        "step": int(step),
        "vocab": vocab.to_dict(),
        "embedding_rows": vocab.vocab_size if fmt == "hf" else model_cfg.vocab_size,
        "model": model_cfg.to_dict(),
    }
    pathlib.Path(out_dir, run_files.EXPORT).write_text(json.dumps(rec, indent=2) + "\n")
    return rec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 1 (argparse: usage + exit 2)
        cli.fail(message)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m repeat_scaling.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="training workdir (local or gs://)")
    p.add_argument("--step", type=int, default=None, help="committed step (default: latest)")
    p.add_argument("--format", default="hf", help="hf (Hugging Face T5) or t5x")
    p.add_argument("--out", required=True, help="new or empty local output directory")
    args = p.parse_args(argv)
    try:
        rec = export(args.workdir, args.out, args.format, args.step)
    except ExportError as e:
        cli.print_error(first_line(e))
        return 1
    print(
        f"exported {args.workdir} step {rec['step']} as {rec['format']} to {args.out} "
        f"({rec['embedding_rows']} embedding rows; vocabulary {rec['vocab']['kind']} "
        f"with {rec['vocab']['vocab_size']} ids)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
