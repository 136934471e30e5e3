"""Sweep expansion: run names, overrides, collisions, filters, the submit.py CLI."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from launch import status as status_lib
from repeat_scaling import config_files, sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(sweep):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "d25m", "d_model": 64, "dropout_rate": 0.0})
    c.data = ml_collections.ConfigDict(
        {"repeated_fraction": 0.0, "repeated_epochs": 1, "objective": "causal_lm"}
    )
    c.train = ml_collections.ConfigDict({"steps": 100, "label_smoothing": 0.0})
    c.sweep = sweep
    return c


def _entry(f, e, seed=0, **extra):
    return {"data.repeated_fraction": f, "data.repeated_epochs": e, "seed": seed, **extra}


def test_names_overrides_and_workdirs():
    sweep = [
        _entry(0.0, 1),
        _entry(0.1, 100),
        _entry(0.005, 3, seed=2),
        _entry(0.03, 10_000, **{"model.dropout_rate": 0.1}),
        _entry(0.5, 8, **{"data.objective": "prefix_lm", "train.label_smoothing": 0.1}),
    ]
    runs = sweeps.expand(_config(sweep), "/r/", model_fields=lambda name: None)
    assert [r.name for r in runs] == [
        "d25m_f0_e1_s0",
        "d25m_f10_e100_s0",
        "d25m_f0p5_e3_s2",
        "d25m_f3_e10000_s0_do0p1",
        "d25m_f50_e8_s0_prefixlm_ls0p1",
    ]
    assert runs[1].workdir == "/r/d25m_f10_e100_s0"
    assert runs[3].config.model.dropout_rate == 0.1
    assert runs[3].config.data.repeated_epochs == 10_000
    assert "sweep" not in runs[3].config
    assert runs[4].override_flags() == [
        "--config.data.repeated_fraction=0.5",
        "--config.data.repeated_epochs=8",
        "--config.seed=0",
        "--config.data.objective=prefix_lm",
        "--config.train.label_smoothing=0.1",
    ]
    # Stable: a run's name does not depend on the rest of the sweep.
    alone = sweeps.expand(_config([sweep[3]]), "/r", model_fields=lambda name: None)
    assert alone[0].name == runs[3].name


def test_command_line_overrides_that_change_training_are_named():
    sweep = [_entry(0.0, 1), _entry(0.1, 100, **{"model.dropout_rate": 0.1})]
    named = {"model.dropout_rate": 0.2, "train.label_smoothing": 0.1, "train.steps": 500}
    named |= {"data.store": "elsewhere", "eval.test_batches": 2, "mesh.ici.data": 2}
    runs = sweeps.expand(_config(sweep), "/r", model_fields=lambda name: None, named=named)
    # the entry's own value wins over the command line's; keys that may change on resume
    # (steps, store, evaluation, mesh) are not in names
    assert [r.name for r in runs] == ["d25m_f0_e1_s0_do0p2_ls0p1", "d25m_f10_e100_s0_do0p1_ls0p1"]
    plain = sweeps.expand(_config(sweep), "/r", model_fields=lambda name: None)
    assert [r.name for r in plain] == ["d25m_f0_e1_s0", "d25m_f10_e100_s0_do0p1"]


def test_no_sweep_is_one_run_and_only_filters():
    config = _config(None)
    del config["sweep"]
    (run,) = sweeps.expand(config, "gs://b/x")
    assert (run.name, run.workdir, run.total_steps) == (
        "d25m_f0_e1_s0",
        "gs://b/x/d25m_f0_e1_s0",
        100,
    )
    sweep = [_entry(0.1, e) for e in (1, 10, 100)]
    names = [r.name for r in sweeps.expand(_config(sweep), "/r", only="*_e10_*,*_e100_*")]
    assert names == ["d25m_f10_e10_s0", "d25m_f10_e100_s0"]
    with pytest.raises(sweeps.SweepError, match="matches no run"):
        sweeps.expand(_config(sweep), "/r", only="t5*")


@pytest.mark.parametrize(
    "sweep, message",
    [
        (
            [_entry(0.1, 10), _entry(0.1, 10)],
            "entries 0 and 1 both get the run name 'd25m_f10_e10_s0'",
        ),
        ([{"data.repeted_fraction": 0.1}], "unknown key 'data.repeted_fraction'"),
        ([{"optim.lr": 0.1}], "no 'optim' in the config"),
        ([{"train.steps": "many"}], "bad value 'many' for 'train.steps'"),
        (["d25m"], "sweep entry 0: expected a dict"),
        ([], "non-empty list"),
    ],
)
def test_bad_sweeps_are_clear_errors(sweep, message):
    with pytest.raises(sweeps.SweepError, match=message.replace("(", r"\(")):
        sweeps.expand(_config(sweep), "/r")


def test_model_name_expands_to_the_fields_it_changes():
    sizes = {
        "d25m": {"name": "d25m", "d_model": 64, "dropout_rate": 0.0},
        "d100m": {"name": "d100m", "d_model": 128, "dropout_rate": 0.0},
    }
    config = _config([{"model.name": "d100m"}, {"model.name": "d25m"}])
    config.model.dropout_rate = 0.2  # a customisation of the base, kept for every size
    runs = sweeps.expand(config, "/r", model_fields=sizes.get)
    assert runs[0].name == "d100m_f0_e1_s0"
    assert runs[0].flags == {"model.name": "d100m", "model.d_model": 128}
    assert runs[0].config.model.to_dict() == {"name": "d100m", "d_model": 128, "dropout_rate": 0.2}
    assert runs[1].flags == {"model.name": "d25m"}


def test_number_formatting():
    numbers = (10, 0.5, 0.03 * 100, 1e-05, -2, 2.0**35)
    assert [sweeps.format_number(x) for x in numbers] == [
        "10",
        "0p5",
        "3",
        "1em05",
        "m2",
        "34359738368",
    ]
    assert sweeps.format_flag_value(True) == "true"
    assert sweeps.format_flag_value((1, 2)) == "(1, 2)"


def test_entry_builders_keep_the_core_keys_first():
    assert list(sweeps.point("m", 0.1, 10, 2, **{"model.dropout_rate": 0.1}).items()) == [
        ("model.name", "m"), ("data.repeated_fraction", 0.1), ("data.repeated_epochs", 10),
        ("seed", 2), ("model.dropout_rate", 0.1)]  # fmt: skip
    assert sweeps.all_repeated("m", 1)["data.repeated_fraction"] == 0.0
    assert sweeps.all_repeated("m", 4, seed=1)["data.repeated_fraction"] == 1.0
    lr = {"b": {"train.optimizer.learning_rate": 1e-4}}
    sweep = sweeps.grid(["a", "b"], [0.5], [2, 8], seeds=(0, 1), per_model=lr)
    assert [(e["seed"], e["model.name"], e["data.repeated_epochs"]) for e in sweep] == [
        (s, m, e) for s in (0, 1) for m in "ab" for e in (1, 2, 8)]  # fmt: skip
    assert all(("train.optimizer.learning_rate" in e) == (e["model.name"] == "b") for e in sweep)
    assert len(sweeps.grid(["a"], [0.5], [2, 8], baselines=False)) == 2


def test_finetune_sweep_points_at_the_pretraining_runs():
    base = _config([_entry(0.0, 1), _entry(0.5, 8), _entry(0.5, 8, seed=1)])
    fixed = {"train.label_smoothing": 0.1}
    sweep = sweeps.finetune_sweep(base, select=lambda r: r.config.seed == 0, fixed=fixed)
    assert sweep == [
        {"model.name": "d25m", "train.label_smoothing": 0.1, "seed": 0},
        {"model.name": "d25m", "train.label_smoothing": 0.1, "seed": 0,
         "init_from": "{root}/d25m_f0_e1_s0"},
        {"model.name": "d25m", "train.label_smoothing": 0.1, "seed": 0,
         "init_from": "{root}/d25m_f50_e8_s0"},
    ]  # fmt: skip


def test_submit_cli_dry_run_and_errors(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(
        "import ml_collections\n"
        "def get_config(arg):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = 0\n"
        "    c.data = ml_collections.ConfigDict({'repeated_fraction': 0.0, 'repeated_epochs': 1})\n"
        "    c.train = ml_collections.ConfigDict({'steps': 10 if arg == 'demo' else 99})\n"
        "    c.sweep = [{'data.repeated_fraction': 0.5, 'data.repeated_epochs': e} for e in (2, 4)]\n"
        "    return c\n"
    )
    root = tmp_path / "root"
    cmd = [sys.executable, "launch/submit.py", f"--config={cfg}:demo", f"--root={root}"]
    out = subprocess.run(
        cmd + ["--dry_run", "--eval_mode=after", "--config.train.steps=5"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    py = sys.executable
    assert lines[1:] == [
        f"{py} -m repeat_scaling.train --config={cfg}:demo --workdir={root}/run_f50_e2_s0 "
        "--config.train.steps=5 --config.data.repeated_fraction=0.5 --config.data.repeated_epochs=2",
        f"{py} -m repeat_scaling.evaluate --workdir={root}/run_f50_e2_s0",
        f"{py} -m repeat_scaling.train --config={cfg}:demo --workdir={root}/run_f50_e4_s0 "
        "--config.train.steps=5 --config.data.repeated_fraction=0.5 --config.data.repeated_epochs=4",
        f"{py} -m repeat_scaling.evaluate --workdir={root}/run_f50_e4_s0",
    ]
    assert not root.exists()  # a dry run writes nothing
    bad = subprocess.run(
        [*cmd[:3], "--root=rel/dir", "--backend=tpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: --root='rel/dir': the tpu backend needs a gs:// URL or an absolute path that "
        "every worker shares (e.g. a gcsfuse mount)"
    ]


def test_status_reads_workdir_files(tmp_path):
    run = tmp_path / "d25m_f10_e100_s0"
    (run / "train").mkdir(parents=True)
    (run / "checkpoints" / "50").mkdir(parents=True)
    (run / "checkpoints" / "60.orbax-checkpoint-tmp-1").mkdir()
    (run / "config.json").write_text('{"train": {"steps": 100}}')
    (run / "train" / "metrics.jsonl").write_text(
        '{"step": 50, "loss": 3.5, "step_time": 0.5}\n{"step": 60, "loss": 3.25, "step_time": 0.5}\n{"st'
    )
    (run / "launch.json").write_text('{"state": "stopped"}')
    (st,) = status_lib.root_status(tmp_path)
    assert (st.state, st.step, st.total_steps, st.loss) == ("stopped", 60, 100, 3.25)
    assert st.checkpoint_steps == [50] and not st.trained
    (run / "checkpoints" / "100").mkdir()
    (run / "eval").mkdir()
    (run / "eval" / "results.jsonl").write_text('{"step": 100, "test_loss": 3.0}\n')
    st = status_lib.run_status(run)
    assert (st.state, st.eval_step, st.test_loss) == ("done", 100, 3.0)
    assert "done" in st.line() and "100/100" in st.line() and "eval=3.0000@100" in st.line()
    # Training, with an ETA from the logged step time.
    import os

    (run / "eval" / "results.jsonl").unlink()
    (run / "checkpoints" / "100").rmdir()
    (run / "launch.json").write_text(f'{{"state": "running", "train_pid": {os.getpid()}}}')
    st = status_lib.run_status(run)
    assert (st.state, st.eta_s) == ("training", 20.0)
    assert status_lib.format_eta(3725) == "1h02m"
    out = subprocess.run(
        [sys.executable, "launch/status.py", f"--root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0
    assert out.stdout.splitlines()[-1] == "1 runs: 1 training"
    missing = subprocess.run(
        [sys.executable, "launch/status.py", f"--root={tmp_path / 'nope'}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: --root={str(tmp_path / 'nope')!r} is not a directory"


PAPER_CONFIGS = {  # config file -> number of runs at demo / small / paper scale
    "hernandez2022": (5, 21, 287),
    "xue2023": (5, 12, 53),
    "muennighoff2023": (8, 18, 75),
    "induction_heads": (2, 6, 5),  # and 4 at `cpu`
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_expand_and_validate(name):
    """Every run of every scale has a unique name and passes the trainer's validation."""

    config_lib = pytest.importorskip("repeat_scaling.train.config")
    module = config_files.load_module(REPO / "configs" / f"{name}.py")
    counts = []
    for scale in ("demo", "small", "paper"):
        runs = sweeps.expand(module.get_config(scale), "/r")
        counts.append(len(runs))
        for run in runs:
            model = config_lib.validate(run.config)
            assert model.name == run.config.model.name
            assert run.name.startswith(run.config.model.name + "_f")
        if scale == "demo":
            assert all(r.config.data.source == "builtin" for r in runs)
    assert tuple(counts) == PAPER_CONFIGS[name]
    with pytest.raises(ValueError, match="expected one of"):
        module.get_config("huge")


def test_clamp_sweep_names_say_noclamp_and_which_head_is_clamped():
    module = config_files.load_module(REPO / "configs" / "icl_bursty.py")
    names = [run.name for run in sweeps.expand(module.get_config("sweep"), "/tmp/root")]
    assert len(names) == 2 and names[0].endswith("_noclamp")
    assert names[1].endswith("_clamp_previoustokenl0h0"), names
    window = {"kind": "ablate", "layer": 1, "head": 2, "start_step": 5, "end_step": 9}
    assert sweeps.interventions_tag((window,)) == "clamp_ablatel1h2s5e9"


def _load_config_module(name):
    return config_files.load_module(REPO / "configs" / f"{name}.py")


def _plan_sizes(run, chunks_available):
    """(tokens per non-embedding-free parameter, repeated-subset chunks) of one run."""
    from repeat_scaling.data.repetition import RepetitionPlan
    from repeat_scaling.models import sizes

    c = run.config
    slots = c.train.steps * c.train.batch_size
    plan = RepetitionPlan(
        chunks_available, slots, c.data.repeated_fraction, c.data.repeated_epochs, 0
    )
    params = sizes.count_params(sizes.get(c.model.name))["total"]
    return slots * c.data.length / params, plan.num_repeated


def test_cpu_campaign_grid_is_as_documented():
    """configs/hernandez2022.py:cpu: the documented grid, budget and subset sizes."""
    module = _load_config_module("hernandez2022")
    runs = sweeps.expand(module.get_config("cpu"), "/r")
    assert len(runs) == 36 and len({r.name for r in runs}) == 36
    by_model = {}
    for r in runs:
        by_model.setdefault(r.config.model.name, []).append(r)
    assert sorted(by_model) == ["dec_micro", "dec_mini", "dec_tiny"]
    # The C4 sample's train split holds 4.2M byte tokens: 32,800 chunks of 128.
    config_lib = pytest.importorskip("repeat_scaling.train.config")
    for r in runs:
        c = r.config
        assert config_lib.validate(c).name == c.model.name
        assert c.data.source == module.C4_SAMPLE and c.data.vocab == "byte"
        assert c.eval.test_batches == 64
        # the CPU speed settings the campaign's wall time was measured with
        assert c.model.attention_impl == "cpu_fused" and c.model.scan_unroll == 2
        assert c.train.steps_per_call == 4
        per_param, subset = _plan_sizes(r, 32_800)
        if c.data.repeated_fraction > 0:
            assert subset >= 1, r.name  # every subset is at least one sequence
        if c.train.steps == 1000:
            assert per_param > 9, r.name  # tens of tokens per parameter (dec_mini: 9.6)
    tiny = by_model["dec_tiny"]
    for f in (0.5, 0.1):
        epochs = sorted(r.config.data.repeated_epochs for r in tiny
                        if r.config.data.repeated_fraction == f and r.config.seed == 0)  # fmt: skip
        assert epochs == list(module.CPU_EPOCHS) and epochs[-1] / epochs[0] >= 1000
        seeds = [r for r in tiny if r.config.data.repeated_fraction == f and r.config.seed == 1]
        assert len(seeds) == 3
        # The unique-data control: (1 - f) T tokens, nothing repeated.
        control = [r for r in tiny if r.config.train.steps == round(1000 * (1 - f))]
        assert len(control) == 1 and control[0].config.data.repeated_fraction == 0
    baselines = [r for r in runs if r.config.data.repeated_fraction == 0 and r.config.train.steps == 1000]  # fmt: skip
    assert sorted((r.config.model.name, r.config.seed) for r in baselines) == [
        ("dec_micro", 0), ("dec_mini", 0), ("dec_tiny", 0), ("dec_tiny", 1)]  # fmt: skip


def test_demo_sweep_spans_three_decades_of_epochs():
    module = _load_config_module("demo")
    runs = sweeps.expand(module.get_config("sweep"), "/r")
    repeated = [r for r in runs if r.config.data.repeated_fraction > 0]
    epochs = sorted(r.config.data.repeated_epochs for r in repeated)
    assert len(epochs) >= 5 and epochs[-1] / epochs[0] >= 1000
    assert [r.config.data.repeated_fraction for r in runs].count(0.0) == 1
    # The built-in corpus's train split: 1,825,408 tokens in 14,261 chunks of 128.
    for r in runs:
        per_param, subset = _plan_sizes(r, 14_261)
        assert per_param > 30 and (subset >= 1 or r.config.data.repeated_fraction == 0)


def test_xue_cpu_campaign_grid_is_as_documented():
    """configs/xue2023.py:cpu: t5_tiny, all data repeated at E = 1..256, dropout at the
    largest E, seeds at both ends; every unique set is at least one example."""
    config_lib = pytest.importorskip("repeat_scaling.train.config")
    module = _load_config_module("xue2023")
    runs = sweeps.expand(module.get_config("cpu"), "/r")
    assert len(runs) == 12
    mlm = [r for r in runs if r.config.data.objective == "span_corruption"]
    plain = [r for r in mlm if r.config.model.dropout_rate == 0 and r.config.seed == 0]
    assert sorted(r.config.data.repeated_epochs for r in plain) == list(module.CPU_EPOCHS)
    for r in runs:
        c = r.config
        assert config_lib.validate(c).name == "t5_tiny" and c.data.source == "builtin"
        f, e = c.data.repeated_fraction, c.data.repeated_epochs
        assert (f, e) == (0.0, 1) or f == 1.0
        # Span corruption at inputs 128 reads 141 store tokens per example; the built-in
        # corpus holds 12,946 of them, more than the 12,800 examples of the budget.
        slots = c.train.steps * c.train.batch_size
        assert slots <= 12_946 and slots // e >= 1
    worst = module.CPU_EPOCHS[-1]
    dropped = [r for r in mlm if r.config.model.dropout_rate > 0]
    assert {(r.config.data.repeated_epochs, r.config.train.dropout_start_step) for r in dropped} == {
        (worst, 0), (worst, 400)}  # fmt: skip
    assert sorted(r.config.seed for r in mlm if r.config.data.repeated_epochs == worst
                  and r.config.model.dropout_rate == 0) == [0, 1]  # fmt: skip


def test_induction_cpu_campaign_grid():
    config_lib = pytest.importorskip("repeat_scaling.train.config")
    module = _load_config_module("induction_heads")
    runs = sweeps.expand(module.get_config("cpu"), "/r")
    assert len(runs) == 4
    for r in runs:
        assert config_lib.validate(r.config).attention_only
        assert r.config.data.source == module.CPU_SOURCE
    settings = sorted((r.config.data.repeated_fraction, r.config.seed) for r in runs)
    assert settings == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
