"""End-to-end report: a partial sweep of run directories -> figures, CSVs, report.md.

The sweep is written here in the trainer/evaluator layout (config.json, data_plan.json,
eval/results.jsonl, train/metrics.jsonl). Its losses follow a known law, so the report's
effective sizes can be checked: baselines L(N) = 1.7 + (1e8/N)^0.3, and a repeated run
with multiplier m has the final loss of a baseline of size m*N.
"""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

from repeat_scaling.report import runs as runs_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, TOKENS_PER_STEP = 1000, 4096
SIZES = {"tiny": 1e6, "small": 4e6, "medium": 1.6e7}  # non-embedding parameters


def law(n: float) -> float:
    return 1.7 + (1e8 / n) ** 0.3


def write_run(
    root: pathlib.Path,
    name: str,
    model: str,
    fraction: float,
    epochs: float,
    multiplier: float = 1.0,
    objective: str = "causal_lm",
    dropout: float = 0.0,
    last_step: int = STEPS,
    corrupt_line: bool = False,
    with_plan: bool = True,
) -> pathlib.Path:
    """One realistic run directory whose final test loss is law(multiplier * N)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "train").mkdir()
    n = SIZES[model]
    total = STEPS * TOKENS_PER_STEP
    config = {
        "seed": 0,
        "model": {
            "name": model,
            "arch": "decoder_only",
            "dropout_rate": dropout,
            "droppath_rate": 0.0,
            "num_experts": 0,
            "param_share": False,
        },
        "data": {
            "objective": objective,
            "repeated_fraction": fraction,
            "repeated_epochs": epochs,
            "store": "/stores/c4_byte",
        },
        "train": {
            "steps": STEPS,
            "batch_size": 8,
            "label_smoothing": 0.0,
            "dropout_start_step": 0,
        },
        "derived": {
            "params": {"total": n + 384 * 64, "non_embedding": n, "trainable": n + 384 * 64},
            "tokens_per_step": TOKENS_PER_STEP,
            "total_tokens": total,
            "flops_per_token": {"forward": 2 * n, "train": 6 * n},
        },
    }
    (run / "config.json").write_text(json.dumps(config, indent=2))
    if with_plan:
        repeated = fraction * total
        plan = {
            "requested": {"repeated_fraction": fraction, "repeated_epochs": epochs},
            "realised": {"repeated_fraction": fraction, "repeated_epochs": epochs},
            "repeated_chunks": int(repeated / epochs / 512),
            "unique_chunks": int((total - repeated) / 512),
            "num_slots": STEPS * 8,
            "num_chunks": 20000,
            "repeated_tokens": repeated,
            "subset_tokens": repeated / epochs,
            "unique_tokens": total - repeated,
            "total_tokens": total,
        }
        (run / "data_plan.json").write_text(json.dumps(plan))
    final = law(multiplier * n)
    lines, metrics = [], []
    for step in range(200, last_step + 1, 200):
        excess = 0.8 * (STEPS / step - 1)
        row = {
            "step": step,
            "tokens_seen": step * TOKENS_PER_STEP,
            "unique_tokens_seen": step * TOKENS_PER_STEP * (1 - fraction),
            "repeated_tokens_seen": step * TOKENS_PER_STEP * fraction,
            "test_loss": final + excess,
            "test_accuracy": 0.9 - 0.1 * (final + excess),
            "repeated_loss": (final + excess) * (1 - fraction * step / STEPS),
            "unique_seen_loss": final + excess - 0.01,
            "copy_loss": 0.5 + (5e7 / (multiplier * n)) ** 0.35 + excess,
            "random_repeat_loss": 2.0 + excess,
            "prefix_matching": 1 - (3e5 / (multiplier * n)) ** 0.4 if step > 200 else None,
            "previous_token": 0.6 + 0.0001 * step,
            "copying_score": 0.3,
            "icl_score": -0.2 - 0.0002 * step,
        }
        lines.append(json.dumps(row))
        metrics.append(
            json.dumps(
                {"step": step, "loss": final + excess, "learning_rate": 1e-3, "tokens_per_s": 1e4}
                | {"tokens_seen": step * TOKENS_PER_STEP}
            )
        )
    if corrupt_line:
        lines.insert(2, '{"step": 500, "test_loss": 3.1, "copy_lo')  # a torn write
    (run / "eval" / "results.jsonl").write_text("\n".join(lines) + "\n")
    (run / "train" / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    return run


MULTIPLIERS = {10: 0.8, 100: 0.5}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("sweep")
    for model in SIZES:
        write_run(root, f"{model}_f0", model, 0.0, 1.0)
        for epochs, mult in MULTIPLIERS.items():
            name = f"{model}_f0.1_E{epochs}"
            if model == "medium" and epochs == 100:
                (root / name).mkdir()  # queued, never started: the missing run
            elif model == "small" and epochs == 100:
                write_run(root, name, model, 0.1, epochs, mult, last_step=600)  # training
            else:
                corrupt = model == "tiny" and epochs == 10
                write_run(root, name, model, 0.1, epochs, mult, corrupt_line=corrupt)
    # Hernandez et al.'s fraction scan: a second fraction at E = 10.
    write_run(root, "tiny_f0.5_E10", "tiny", 0.5, 10.0, 0.6)
    # Xue et al.: all data repeated 4 times, per objective and with dropout.
    write_run(root, "small_f1_E4", "small", 1.0, 4.0, 0.6)
    write_run(root, "small_f1_E4_dropout", "small", 1.0, 4.0, 0.75, dropout=0.1)
    write_run(root, "small_prefix_f0", "small", 0.0, 1.0, objective="prefix_lm", with_plan=False)
    write_run(root, "small_prefix_f1_E4", "small", 1.0, 4.0, 0.55, objective="prefix_lm")
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run(
        [sys.executable, "-m", "repeat_scaling.report", f"--runs={sweep}/*", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_writes_every_figure_and_csv(report):
    out, stdout = report
    assert "report.md" in stdout
    names = ["degradation_curves", "double_descent", "baseline_fits", "effective_params"]
    names += ["xue_epochs", "data_constrained", "probes", "fraction_scan"]
    for name in names:
        png = out / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert read_csv(out / f"{name}.csv"), f"{name}.csv has no plotted points"
    assert read_csv(out / "fits.csv")


def test_double_descent_csv_has_one_row_per_run_and_recovers_multipliers(report):
    out, _ = report
    rows = {row["run"]: row for row in read_csv(out / "double_descent.csv")}
    # 3 baselines + 5 of the 6 f=0.1 runs (one never started) + 1 f=0.5 + 4 Xue runs.
    assert len(rows) == 13
    assert float(rows["tiny_f0.5_E10"]["multiplier"]) == pytest.approx(0.6, rel=0.01)
    required = ["model", "params", "repeated_fraction", "repeated_epochs", "final_test_loss"]
    assert set(required + ["effective_params"]) <= set(next(iter(rows.values())))
    for model, n in SIZES.items():
        for epochs, mult in MULTIPLIERS.items():
            row = rows.get(f"{model}_f0.1_E{epochs}")
            if row is None or row["status"] != "finished":
                continue
            assert float(row["params"]) == n
            assert float(row["repeated_epochs"]) == epochs
            assert float(row["effective_params"]) == pytest.approx(mult * n, rel=0.01)
            assert float(row["multiplier"]) == pytest.approx(mult, rel=0.01)
            assert float(row["copy_loss_multiplier"]) == pytest.approx(mult, rel=0.01)
            assert float(row["prefix_matching_multiplier"]) == pytest.approx(mult, rel=0.01)
    assert rows["small_f1_E4_dropout"]["regularisation"] == "dropout 0.1"
    assert float(rows["small_f1_E4_dropout"]["multiplier"]) == pytest.approx(0.75, rel=0.01)
    training = rows["small_f0.1_E100"]
    assert training["status"] == "training"
    assert training["final_test_loss"] == "" and training["effective_params"] == ""
    assert float(training["latest_test_loss"]) > 0
    # The corrupt line was skipped, the run still counts.
    assert rows["tiny_f0.1_E10"]["status"] == "finished"
    # prefix_lm has a single baseline size: no fit, so no effective size.
    assert rows["small_prefix_f1_E4"]["effective_params"] == ""
    assert float(rows["small_prefix_f0"]["repeated_fraction"]) == 0


def test_baseline_fit_recovers_the_law(report):
    out, _ = report
    fit = next(
        row
        for row in read_csv(out / "fits.csv")
        if row["metric"] == "test_loss"
        and row["objective"] == "causal_lm"
        and row["form"] == "offset"
    )
    assert float(fit["nc"]) == pytest.approx(1e8, rel=0.01)
    assert float(fit["alpha"]) == pytest.approx(0.3, rel=0.01)
    assert float(fit["e0"]) == pytest.approx(1.7, rel=0.01)


def test_report_md_embeds_figures_and_says_what_is_missing(report):
    out, _ = report
    text = (out / "report.md").read_text()
    for name in ["degradation_curves", "double_descent", "effective_params", "data_constrained"]:
        assert f"]({name}.png)" in text
        assert f"]({name}.csv)" in text
    missing = text.split("## What is missing")[1].split("## Runs")[0]
    assert "medium_f0.1_E100: no readable config.json" in missing
    assert "small_f0.1_E100: still training: last evaluated step 600 of 1000" in missing
    assert "tiny_f0.1_E10" in missing and "line 3: corrupt JSON line skipped" in missing
    # Only launched run directories are listed, never cells of a grid nobody launched.
    assert "sweep cell" not in missing
    assert "small_prefix_f0" in missing and "data_plan.json: file missing" in missing
    assert (
        "baseline fit (decoder_only, prefix_lm) of test_loss, copy_loss, prefix_matching: no offset_free fit, need >= 2 distinct"
        in missing
    )
    assert "| published | 520.8 | 1488 |" in text
    # causal_lm and prefix_lm runs are never pooled into one data-constrained refit.
    assert "| refit |" not in text
    assert "mix 2 kinds of model (decoder_only, causal_lm; decoder_only, prefix_lm)" in text


def test_cli_errors_are_one_line(tmp_path):
    for args, expected in [
        ([f"--runs={tmp_path}/nothing*", f"--out={tmp_path}/r"], "matches no run directory"),
        ([f"--runs={tmp_path}"], "--out is required"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "repeat_scaling.report", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_read_jsonl_skips_corrupt_lines_and_keeps_last_duplicate(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(
        '{"step": 2, "test_loss": 3.0}\nnot json\n[1]\n{"test_loss": 1}\n'
        '{"step": 1, "test_loss": 4.0}\n{"step": 2, "test_loss": 2.5}\n'
    )
    problems: list[str] = []
    rows = runs_lib.read_jsonl(str(path), problems)
    assert [(r["step"], r["test_loss"]) for r in rows] == [(1, 4.0), (2, 2.5)]
    assert [p.split(": ", 1)[0].rsplit(" ", 2)[-2:] for p in problems] == [
        ["line", "2"],
        ["line", "3"],
        ["line", "4"],
    ]


def test_load_run_of_missing_directory_is_reported_not_raised(tmp_path):
    run = runs_lib.load_run(str(tmp_path / "gone"))
    assert run.status == runs_lib.STATUS_MISSING
    assert "run directory missing" in run.problems[0]
    with pytest.raises(runs_lib.ReportError, match="param_key='flops'"):
        runs_lib.load_run(str(tmp_path), param_key="flops")


def test_run_labels_and_token_accounting_follow_config_and_plan(tmp_path):
    path = write_run(tmp_path, "moe", "small", 0.1, 100.0, dropout=0.2)
    config = json.loads((path / "config.json").read_text())
    config["model"] |= {"num_experts": 8, "param_share": True}
    config["train"] |= {"dropout_start_step": 500, "label_smoothing": 0.1}
    (path / "config.json").write_text(json.dumps(config))
    plan = json.loads((path / "data_plan.json").read_text())
    # Whole chunks: the realised fraction differs a little from the requested one.
    plan["realised"]["repeated_fraction"] = 0.0996
    plan |= {"total_tokens": 1000, "unique_tokens": 900, "subset_tokens": 1}
    (path / "data_plan.json").write_text(json.dumps(plan))
    run = runs_lib.load_run(str(path))
    assert run.regularisation == "staged dropout 0.2 + label smoothing 0.1 + MoE x8 + ParamShare"
    assert run.repeated_fraction == 0.1 and run.realised_fraction == 0.0996
    assert run.setting == "f=0.1 E=100"
    assert run.unique_tokens == pytest.approx(STEPS * TOKENS_PER_STEP * 0.901)
    assert run.params == SIZES["small"]
    assert runs_lib.load_run(str(path), param_key="total").params == SIZES["small"] + 384 * 64


def test_report_package_imports_neither_jax_nor_tensorflow():
    code = (
        "import sys; import repeat_scaling.report.__main__; "
        "bad = sorted(m for m in ('jax', 'tensorflow', 'seqio', 'flax') if m in sys.modules); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _retouch(path, **changes):
    """Edit a written run's config.json: dotted key -> value."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        *groups, last = key.split(".")
        node = config
        for g in groups:
            node = node.setdefault(g, {})
        node[last] = value
    (path / "config.json").write_text(json.dumps(config))


def test_findings_group_seeds_and_keep_other_settings_apart(tmp_path):
    """Seeds average into one family; a learning-rate override is its own family with its
    own label; the unique-data control is found by its token budget."""
    from repeat_scaling.report import findings, plotting

    # Losses law(multiplier * N): a lower multiplier is a higher loss.
    curve = {2: 1.0, 8: 0.5, 32: 0.05, 128: 0.3}
    for e, mult in curve.items():
        for seed in (0, 1):
            p = write_run(
                tmp_path, f"rep_e{e}_s{seed}", "small", 0.5, float(e), mult * (1 + seed / 50)
            )
            _retouch(p, seed=seed)
        p = write_run(tmp_path, f"lr_e{e}", "small", 0.5, float(e), 1.0)
        _retouch(p, **{"train.optimizer.learning_rate": 0.1})
    write_run(tmp_path, "base_s0", "small", 0.0, 1.0)
    runs = [runs_lib.load_run(str(p)) for p in sorted(tmp_path.iterdir())]
    found = findings.analyse(runs)
    dd = [f for f in found if f.kind == "double_descent"]
    assert len(dd) == 2
    main = next(f for f in dd if "learning_rate" not in f.family)
    other = next(f for f in dd if "learning_rate=0.1" in f.family)
    assert main.verdict == "reproduced" and main.numbers["peak_epochs"] == 32
    assert main.numbers["seeds"] == [2, 2, 2, 2] and main.numbers["noise_std"] > 0
    assert other.verdict == "not reproduced"  # flat: every E at multiplier 1
    labels = {plotting.run_label(r, runs) for r in runs}
    assert "small, learning_rate=0.1, f=0.5 E=32, seed 0" in labels
    assert "small, f=0.5 E=32, seed 1" in labels


def test_peak_shift_across_model_sizes(tmp_path):
    from repeat_scaling.report import findings

    # The smaller model peaks at the larger E, as Hernandez et al. find.
    for model, worst in (("small", 128), ("medium", 32)):
        for e in (2, 8, 32, 128, 512):
            write_run(tmp_path, f"{model}_e{e}", model, 0.5, float(e), 0.1 if e == worst else 1.0)
        write_run(tmp_path, f"{model}_base", model, 0.0, 1.0)
    runs = [runs_lib.load_run(str(p)) for p in sorted(tmp_path.iterdir())]
    shift = [f for f in findings.analyse(runs) if f.kind == "peak_shift"]
    assert len(shift) == 1 and shift[0].verdict == "reproduced"
    assert shift[0].numbers["models"] == ["small", "medium"]
    assert shift[0].numbers["peak_epochs"] == [128.0, 32.0]
