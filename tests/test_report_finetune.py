"""The report's fine-tuning section: Hernandez curves, effective sizes, the Xue table.

Run directories are written here in the trainer/evaluator layout (config.json,
data_plan.json, eval/results.jsonl, init_from.json for fine-tuned runs). Fine-tuning
losses follow a known law so effective sizes can be checked: from-scratch runs end at
L(N) = 1.5 + (1e7/N)^0.3, and a fine-tuned run with multiplier m ends at L(m*N).
"""

import csv
import json
import math
import pathlib

import pytest

from repeat_scaling.report import finetune, markdown
from repeat_scaling.report import runs as runs_lib

STEPS, TOKENS_PER_STEP = 100, 1024
SIZES = {"s": 1e6, "m": 4e6, "l": 1.6e7}


def law(n: float) -> float:
    return 1.5 + (1e7 / n) ** 0.3


def write_run(
    root: pathlib.Path,
    name: str,
    model: str,
    store: str,
    final_loss: float,
    fraction: float = 0.0,
    epochs: float = 1,
    init_from: pathlib.Path | None = None,
    last_step: int = STEPS,
    extra=None,
) -> pathlib.Path:
    """A run directory whose test loss falls to ``final_loss`` at step STEPS."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    n = SIZES[model]
    data = {"objective": "causal_lm", "repeated_fraction": fraction, "repeated_epochs": epochs}
    data["store"] = store
    config = {
        "seed": 0,
        "model": {"name": model, "arch": "decoder_only", "dropout_rate": 0.0},
        "data": data,
        "train": {"steps": STEPS, "batch_size": 4},
        "derived": {
            "params": {"total": n + 1000, "non_embedding": n},
            "total_tokens": STEPS * TOKENS_PER_STEP,
        },
    }
    (run / "config.json").write_text(json.dumps(config))
    if init_from is not None:
        source = json.loads((init_from / "config.json").read_text())
        record = {
            "path": str(init_from.resolve()),
            "kind": "run",
            "step": STEPS,
            "model": source["model"],
            "source_config": source["data"],
        }
        (run / "init_from.json").write_text(json.dumps(record))
    lines = []
    for step in range(25, last_step + 1, 25):
        row = {
            "step": step,
            "tokens_seen": step * TOKENS_PER_STEP,
            "test_loss": final_loss + (STEPS - step) / STEPS,
            "test_accuracy": 0.3 + 0.001 * step - fraction * 0.1,
        }
        row.update((extra or {}).get(step, {}))
        lines.append(json.dumps(row))
    (run / "eval" / "results.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def sweep(tmp_path):
    """Pre-training at f=0 and f=0.5 E=100 (sizes s, m), each fine-tuned on 'code', plus
    from-scratch runs on 'code' at three sizes; one fine-tuned run is still training."""
    root = tmp_path / "runs"
    pre = {}
    for model in ("s", "m"):
        loss = law(SIZES[model]) + 1
        pre[(model, 0)] = write_run(root, f"{model}_f0", model, "/st/c4", loss)
        pre[(model, 50)] = write_run(root, f"{model}_f50", model, "/st/c4", loss + 0.2, 0.5, 100)
    for model in ("s", "m", "l"):
        write_run(root, f"{model}_scratch", model, "/st/code", law(SIZES[model]))
    ds = {100: {"downstream_em": 0.4, "downstream_f1": 0.5}}
    ds_best = {50: {"downstream_em": 0.6, "downstream_f1": 0.7}, **ds}
    write_run(root, "s_ft_f0", "s", "/st/code", law(2 * SIZES["s"]), init_from=pre[("s", 0)],
              extra=ds_best)  # fmt: skip
    write_run(root, "s_ft_f50", "s", "/st/code", law(0.5 * SIZES["s"]),
              init_from=pre[("s", 50)], extra=ds)  # fmt: skip
    write_run(root, "m_ft_f50", "m", "/st/code", law(SIZES["m"]), init_from=pre[("m", 50)],
              last_step=50)  # fmt: skip
    return root


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_curves_effective_sizes_and_xue_table(sweep, tmp_path):
    runs, problems = runs_lib.load_runs([str(sweep / "*")])
    assert not problems
    pretrain, groups = finetune.split_runs(runs)
    assert sorted(r.name for r in pretrain) == ["m_f0", "m_f50", "s_f0", "s_f50"]
    (group,) = groups
    assert group.data == "/st/code"
    assert sorted(r.name for r in group.finetuned) == ["m_ft_f50", "s_ft_f0", "s_ft_f50"]
    assert sorted(r.name for r in group.scratch) == ["l_scratch", "m_scratch", "s_scratch"]
    by_name = {r.name: r for r in runs}
    assert by_name["s_ft_f50"].pretrain_setting == "f=0.5 E=100"
    assert by_name["s_ft_f0"].pretrain_setting == "unique"

    out = tmp_path / "report"
    summary = markdown.write_report(runs, problems, str(out))
    assert summary.n_runs == 10
    # (a) one curve per pre-training setting plus from scratch, per model panel.
    assert (out / "finetune_curves.png").stat().st_size > 1000
    rows = _csv(out / "finetune_curves.csv")
    small = {(r["role"], r["pretrain_setting"]) for r in rows if r["model"] == "s"}
    assert small == {("scratch", "from scratch"), ("finetuned", "unique"),
                     ("finetuned", "f=0.5 E=100")}  # fmt: skip
    assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    assert {r["pretrain_run"] for r in rows if r["run"] == "s_ft_f50"} == {"s_f50"}
    # (b) the scratch fit (three sizes) recovers the multipliers built into the losses.
    eff = {r["run"]: r for r in _csv(out / "finetune_effective.csv")}
    assert float(eff["s_ft_f0"]["scratch_multiplier"]) == pytest.approx(2.0, rel=0.02)
    assert float(eff["s_ft_f50"]["scratch_multiplier"]) == pytest.approx(0.5, rel=0.02)
    ratio = law(0.5 * SIZES["s"]) / law(SIZES["s"])
    assert float(eff["s_ft_f50"]["ratio_vs_scratch"]) == pytest.approx(ratio)
    unique_ratio = law(0.5 * SIZES["s"]) / law(2 * SIZES["s"])
    assert float(eff["s_ft_f50"]["ratio_vs_unique_ft"]) == pytest.approx(unique_ratio)
    assert eff["s_ft_f50"]["unique_ft_multiplier"] == ""  # one f=0-FT size: no fit
    assert eff["m_ft_f50"]["final_test_loss"] == ""  # still training
    # (c) Xue table: source accuracy at the init step, downstream final and best EM.
    xue = {r["run"]: r for r in _csv(out / "xue_downstream.csv")}
    assert xue["s_ft_f50"]["pretrain_run"] == "s_f50"
    assert float(xue["s_ft_f50"]["pretrain_test_accuracy"]) == pytest.approx(0.35)
    assert int(xue["s_ft_f50"]["pretrain_step"]) == STEPS
    assert float(xue["s_ft_f50"]["pretrain_unique_tokens"]) == pytest.approx(
        STEPS * TOKENS_PER_STEP * (0.5 + 0.5 / 100)
    )
    assert (float(xue["s_ft_f0"]["final_em"]), float(xue["s_ft_f0"]["best_em"])) == (0.4, 0.6)
    assert int(xue["s_ft_f0"]["best_step"]) == 50
    assert xue["s_scratch"]["pretrain_run"] == "from scratch"

    md = (out / "report.md").read_text()
    assert "## Fine-tuning after repeated pre-training" in md
    assert "![Fine-tuned vs from scratch on the new data](finetune_curves.png)" in md
    assert "run m_ft_f50: still training" in md
    # The pre-training analyses do not see the fine-tuning runs.
    dd = {r["run"] for r in _csv(out / "double_descent.csv")}
    assert dd == {"m_f0", "m_f50", "s_f0", "s_f50"}


def test_single_size_partial_data_never_crashes(tmp_path):
    root = tmp_path / "runs"
    pre = write_run(root, "pre_f50", "s", "/st/c4", 3.2, 0.5, 10)
    write_run(root, "scratch", "s", "/st/code", 2.0)
    write_run(root, "ft", "s", "/st/code", 2.2, init_from=pre)
    write_run(root, "ft_gone", "s", "/st/code", 2.1, init_from=pre, last_step=0)
    (root / "ft_gone" / "init_from.json").write_text(
        json.dumps({"path": str(tmp_path / "deleted"), "kind": "run", "step": 7})
    )
    runs, problems = runs_lib.load_runs([str(root / "*")])
    out = tmp_path / "report"
    markdown.write_report(runs, problems, str(out))
    md = (out / "report.md").read_text()
    assert "one model size from scratch, so no effective-size fit" in md
    assert "A single model size per fine-tuning data set" in md
    assert f"pre-training run {tmp_path / 'deleted'} not found" in md
    assert "No downstream_em / downstream_f1 in any result" in md
    eff = {r["run"]: r for r in _csv(out / "finetune_effective.csv")}
    assert float(eff["ft"]["ratio_vs_scratch"]) == pytest.approx(1.1)
    assert eff["ft"]["scratch_multiplier"] == ""
    assert eff["ft_gone"]["pretrain_setting"] == "pre-trained (setting unknown)"


def test_no_finetuned_runs_leaves_report_unchanged(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", "s", "/st/c4", 3.0)
    runs, problems = runs_lib.load_runs([str(root / "*")])
    out = tmp_path / "report"
    summary = markdown.write_report(runs, problems, str(out))
    assert "Fine-tuning" not in (out / "report.md").read_text()
    assert not (out / "finetune_curves.csv").exists()
    assert all(f.name != "finetune_curves" for f in summary.figures)


def test_xue_source_accuracy_never_from_a_later_checkpoint(tmp_path):
    """Source evaluated at steps 25..100: fine-tuning from step 60 reports step 50, from
    step 10 a blank cell and a note (never the later step-100 row)."""
    root = tmp_path / "runs"
    pre = write_run(root, "pre", "s", "/st/c4", 3.0)
    for name, step in (("ft60", 60), ("ft10", 10), ("ft100", 100)):
        run = write_run(root, name, "s", "/st/code", 2.0, init_from=pre)
        record = json.loads((run / "init_from.json").read_text())
        (run / "init_from.json").write_text(json.dumps({**record, "step": step}))
    runs, problems = runs_lib.load_runs([str(root / "*")])
    _, groups = finetune.split_runs(runs)
    rows, notes = finetune.downstream_rows(groups, runs, "non_embedding")
    xue = {r["run"]: r for r in rows}
    assert xue["ft100"]["pretrain_step"] == 100
    assert xue["ft100"]["pretrain_test_accuracy"] == pytest.approx(0.4)
    assert xue["ft60"]["pretrain_step"] == 50
    assert xue["ft60"]["pretrain_test_accuracy"] == pytest.approx(0.35)
    assert xue["ft60"]["pretrain_test_loss"] == pytest.approx(3.5)
    assert xue["ft10"]["pretrain_step"] is None
    assert xue["ft10"]["pretrain_test_accuracy"] is None
    assert xue["ft10"]["pretrain_test_loss"] is None
    assert notes == [
        "run ft10: pre-training run pre has no test_accuracy at or before step 10 (the "
        "checkpoint fine-tuned from); its accuracy is left blank",
        "run ft60: pre-training run pre was not evaluated at step 60; its accuracy is from "
        "the earlier step 50",
    ]
    out = tmp_path / "report"
    markdown.write_report(runs, problems, str(out))
    assert (
        "Xue table: run ft10: pre-training run pre has no test_accuracy"
        in (out / "report.md").read_text()
    )
