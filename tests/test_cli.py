"""Bad command lines of train and submit: the same one-line error, quotes intact."""

import pathlib
import subprocess
import sys

import pytest

from repeat_scaling import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_flag_error_line_keeps_closing_quotes_and_joins_the_hint():
    typo = AttributeError("'\\'stpes\\'\\nDid you mean \"steps\" instead of \"stpes\"?'")
    assert cli.flag_error_line(typo) == 'stpes Did you mean "steps" instead of "stpes"?'
    bad_int = ValueError("flag --x=abc: invalid literal for int() with base 10: 'abc'")
    assert cli.flag_error_line(bad_int).endswith("base 10: 'abc'")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config=configs/demo.py", "--config.train.stpes=3"],
         'error: bad command line: stpes Did you mean "steps" instead of "stpes"?'),
        (["--config=configs/demo.py", "--config.train.steps=abc"],
         "error: bad command line: flag --config.train.steps=abc: invalid literal for int() "
         "with base 10: 'abc'"),
        (["--config=configs/nothere.py"], "error: --config=configs/nothere.py: no such config file"),
        (["--config={bad}"], "error: config file {bad}: line 1: invalid syntax (not valid Python)"),
    ],
)  # fmt: skip
def test_train_and_submit_print_the_same_one_line(tmp_path, args, expected):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    args = [a.format(bad=bad) for a in args]
    expected = expected.format(bad=bad)
    for cmd in (
        [sys.executable, "-m", "repeat_scaling.train", *args, f"--workdir={tmp_path}/w"],
        [sys.executable, "launch/submit.py", *args, f"--root={tmp_path}/r", "--dry_run"],
    ):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = [x for x in proc.stderr.splitlines() if not x.startswith(("I1", "W1"))]
        assert proc.returncode == 1 and lines == [expected], (cmd, proc.stderr[-2000:])
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
