"""Fine-tuning after repeated pre-training, end to end (issue 9, "What it must show").

- The paper configs' fine-tuning stages expand onto the pre-training runs of the same
  sweep root (`init_from="{root}/<run>"`) and pass the trainer's validation.
- A tiny decoder-only model pre-trained on the built-in corpus at f = 0 and at f = 0.5,
  E = 64, each fine-tuned on the built-in Python code corpus (`pystdlib`), plus one run
  from scratch on that code: real trainer, real evaluator, real report; the comparison
  figure has one curve per pre-training setting plus the from-scratch one, all finite.
"""

import contextlib
import csv
import json
import math
import pathlib

import jax
import pytest

from repeat_scaling import config_files, sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
    return config_files.load_module(REPO / "configs" / f"{name}.py")


STAGE_RUNS = {  # config -> (fine-tuned, from scratch) runs at demo / small / paper
    "hernandez2022": ((5, 1), (21, 3), (63, 7)),
    "xue2023": ((5, 1), (4, 1), (9, 1)),
}


@pytest.mark.parametrize("name", sorted(STAGE_RUNS))
def test_finetune_stages_point_at_the_pretraining_runs(name):
    config_lib = pytest.importorskip("repeat_scaling.train.config")
    module = _config_module(name)
    for scale, (n_ft, n_scratch) in zip(module.SCALES, STAGE_RUNS[name]):
        pretrain = {r.workdir for r in sweeps.expand(module.get_config(scale), "/r")}
        runs = sweeps.expand(module.get_config(f"finetune_{scale}"), "/r/")
        finetuned = [r for r in runs if r.config.init_from]
        assert (len(finetuned), len(runs) - len(finetuned)) == (n_ft, n_scratch), scale
        # Every init_from is a pre-training run of the same root, named in the run's tag.
        assert {r.config.init_from for r in finetuned} <= pretrain
        for r in finetuned:
            assert r.name.endswith("_ft_" + r.config.init_from.rsplit("/", 1)[-1])
            assert r.flags["init_from"] == r.config.init_from
        # No fine-tuning run reuses a pre-training run's directory.
        assert not {r.workdir for r in runs} & pretrain
        for r in runs:
            model = config_lib.validate(r.config)
            assert model.name == r.config.model.name
        if name == "hernandez2022":
            assert {r.config.data.source for r in runs} <= {"pystdlib", "pystdlib:tests=1"}
            assert {r.config.data.objective for r in runs} == {"causal_lm"}
        else:
            assert {r.config.data.objective for r in runs} == {"supervised"}


def test_root_template_and_init_from_tag():
    assert sweeps.resolve_root("{root}/a_f0_e1_s0", "gs://b/x/") == "gs://b/x/a_f0_e1_s0"
    assert sweeps.resolve_root(3, "/r") == 3
    assert sweeps.tag_for("init_from", "/r/d25m_f10_e100_s0/") == "ft_d25m_f10_e100_s0"
    with pytest.raises(sweeps.SweepError, match="empty name component"):
        sweeps.tag_for("init_from", "/r/?!/")


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------
# The tiny end-to-end experiment.
PRETRAIN = {"data.length": 64, "train.steps": 16, "train.batch_size": 8}
PRETRAIN |= {"train.checkpoint_every": 8, "train.keep": 2, "train.log_every": 4}
FINETUNE = {"data.length": 64, "train.steps": 8, "train.batch_size": 8}
FINETUNE |= {"train.checkpoint_every": 4, "train.keep": 2, "train.log_every": 4}
SETTINGS = {"unique": (0.0, 1), "f=0.5 E=16": (0.5, 16)}
EVAL = dict(
    batch_size=8,
    test_batches=1,
    memorisation_examples=8,
    copy_examples=8,
    random_repeat_examples=8,
    icl_examples=8,
    probe_sequences=8,
    frequency_tokens=100_000,
)


def _tiny(store, overrides, **top):
    """configs/demo.py:dec (dec_tiny, causal LM, byte vocabulary) with ``overrides``."""
    c = _config_module("demo").get_config("dec")
    c.data.store = str(store)
    for key, value in {**overrides, "train.progress_bar": "off"}.items():
        group, name = key.split(".")
        c[group][name] = value
    c.train.optimizer.warmup_steps = 2
    for key, value in top.items():
        c[key] = value
    return c


@contextlib.contextmanager
def persistent_compilation_cache(path):
    """JAX's persistent compilation cache in ``path`` for the duration (then restored).

    All five runs share every shape, but each ``train``/``Evaluator`` call jits new
    functions; the cache turns the later ~40 s compilations (busy 2-core CPU) into
    ~4 s loads.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    for key, value in zip(keys, (str(path), 0, 0)):
        jax.config.update(key, value)
    cc.reset_cache()
    try:
        yield
    finally:
        for key, value in old.items():
            jax.config.update(key, value)
        cc.reset_cache()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Pre-train at two settings, fine-tune each on pystdlib, train one from scratch,
    evaluate every run with the real evaluator: the sweep root."""
    tmp = tmp_path_factory.mktemp("finetune")
    with persistent_compilation_cache(tmp / "jax_cache"):
        return _experiment(tmp)


def _experiment(tmp):
    from repeat_scaling.eval import evaluator
    from repeat_scaling.eval.settings import EvalSettings
    from repeat_scaling.prepare import prepare_store
    from repeat_scaling.train import loop

    quiet = dict(progress=False, log=lambda *a: None)
    text = prepare_store("builtin", "byte", tmp / "stores" / "builtin", **quiet)
    code = prepare_store("pystdlib:max_docs=40", "byte", tmp / "stores" / "code", **quiet)
    assert code.manifest["source"]["kind"] == "pystdlib"
    root = tmp / "runs"
    workdirs = []
    for label, (f, e) in SETTINGS.items():
        pre = root / f"pre_{label.replace(' ', '_')}"
        over = {**PRETRAIN, "data.repeated_fraction": f, "data.repeated_epochs": e}
        loop.train(_tiny(text.path, over), pre)
        ft = root / f"ft_{pre.name}"
        loop.train(_tiny(code.path, FINETUNE, init_from=str(pre)), ft)
        workdirs += [pre, ft]
    scratch = root / "scratch"
    loop.train(_tiny(code.path, FINETUNE), scratch)
    workdirs.append(scratch)
    mesh = evaluator.eval_mesh(1)
    for work in workdirs:
        evaluator.Evaluator(work, EvalSettings(**EVAL), mesh).run_all()
    return root


@pytest.mark.slow
def test_pretrained_at_two_settings_finetuned_on_python_vs_scratch(experiment, tmp_path):
    from repeat_scaling.report import markdown
    from repeat_scaling.report import runs as runs_lib

    record = json.loads((experiment / "ft_pre_f=0.5_E=16" / "init_from.json").read_text())
    assert record["kind"] == "run" and record["step"] == PRETRAIN["train.steps"]
    assert record["path"] == str((experiment / "pre_f=0.5_E=16").resolve())
    assert record["source_config"]["repeated_fraction"] == 0.5

    runs, problems = runs_lib.load_runs([str(experiment / "*")])
    assert len(runs) == 5 and all(r.finished for r in runs), [r.progress() for r in runs]
    out = tmp_path / "report"
    summary = markdown.write_report(runs, problems, str(out))
    assert "finetune_curves" in [f.name for f in summary.figures if f.png]
    assert (out / "finetune_curves.png").stat().st_size > 5000

    rows = _csv(out / "finetune_curves.csv")
    curves = {}
    for row in rows:
        curves.setdefault(row["pretrain_setting"], []).append(float(row["test_loss"]))
    # One curve per pre-training setting plus from scratch, each with both checkpoints.
    assert sorted(curves) == ["f=0.5 E=16", "from scratch", "unique"]
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in curves.values())
    # Pre-training on English text helps on code at the first fine-tuning checkpoint.
    assert curves["unique"][0] < curves["from scratch"][0]
    eff = _csv(out / "finetune_effective.csv")
    assert len(eff) == 2
    assert all(math.isfinite(float(r["ratio_vs_scratch"])) for r in eff)
    md = (out / "report.md").read_text()
    assert "one model size from scratch, so no effective-size fit" in md
    # The pre-training runs still make the pre-training figures.
    assert {r["run"] for r in _csv(out / "double_descent.csv")} == {
        "pre_unique",
        "pre_f=0.5_E=16",
    }
