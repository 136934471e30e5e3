"""The compile check (`python -m repeat_scaling.compile`): the trainer's programs compiled
for abstract TPU devices (libtpu, no TPU) on this CPU host, and `submit.py --backend=tpu`
refusing a sweep whose run does not fit, before any VM command.

The models are tiny (tests/tiny_compile_config.py): each compile takes seconds.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from repeat_scaling import config_files
from repeat_scaling.compile import CompileCheckError
from repeat_scaling.compile import check as check_lib
from repeat_scaling.compile.cli import apply_model_name
from repeat_scaling.compile.devices import has_cuda_plugin
from repeat_scaling.compile.report import format_report, json_line, misfit_line
from repeat_scaling.compile.topologies import get_topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tests/tiny_compile_config.py"

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (the dev extra installs it on Linux x86_64)",
)


def tiny(arg: str):
    return config_files.load_module(os.path.join(REPO, TINY)).get_config(arg)


def base(config):
    """The config without its sweep (what one run compiles)."""
    config = config.copy_and_resolve_references()
    del config["sweep"]
    return config


@pytest.fixture(scope="module")
def fits_report():
    return check_lib.check(base(tiny("fits")), "v5e-8", eval_topology="v5litepod-1")


@pytest.fixture(scope="module")
def oom_report():
    return check_lib.check(base(tiny("oom")), "v5litepod-8", eval_topology=None)


# -- the topology table ----------------------------------------------------------------
def test_topology_table():
    t = get_topology("v4-128")
    assert (t.topology_name, t.chips, t.hosts, t.wrap) == ("v4:4x4x4", 64, 16, (True,) * 3)
    assert t.generation.chip_config == "megacore" and t.generation.hbm_gib == 32
    t = get_topology("v5p-512")
    assert (t.topology_name, t.chips, t.hosts) == ("v5:4x8x8", 256, 64)
    for name in ("v5litepod-256", "v5e-256"):
        t = get_topology(name)
        assert (t.accelerator_type, t.topology_name, t.hosts) == ("v5litepod-256", "v5e:16x16", 64)
        assert t.wrap == (True, True, False)
    t = get_topology("v5litepod-8")
    assert (t.topology_name, t.hosts, t.chips_per_host) == ("v5e:2x4", 1, (2, 4, 1))
    t = get_topology("v6e-64")
    assert (t.topology_name, t.hosts, t.generation.peak_bf16_tflops) == ("v6e:8x8", 16, 918.0)
    with pytest.raises(CompileCheckError) as e:
        get_topology("v9-8")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown --topology='v9-8'")
    assert "v4-128" in msg and "v5litepod-256" in msg and "v5p-512" in msg and "v6e-64" in msg


def test_no_libtpu_is_one_line(tmp_path):
    """A Python where `import libtpu` fails: one line saying how to get it."""
    stub = tmp_path / "stub" / "libtpu"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no libtpu here')\n")
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(tmp_path / "stub")
    cmd = [sys.executable, "-m", "repeat_scaling.compile", f"--config={TINY}:fits",
           "--topology=v5e-8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: libtpu is not installed: run `make setup`")
    assert "pip install 'jax[tpu]==" in proc.stderr


# -- compiling ----------------------------------------------------------------------------
@needs_libtpu
def test_tiny_model_fits_v5e_8(fits_report):
    r = fits_report
    assert r["topology"]["accelerator_type"] == "v5litepod-8" and r["topology"]["devices"] == 8
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    h = r["hbm"]
    assert h["arguments"] > 0 and h["total"] > 0 and h["fits"] is True and r["fits"] is True
    assert h["hbm"] == int(15.75 * 2**30) and h["headroom"] == h["hbm"] - h["total"]
    assert r["feature_shapes"]["decoder_target_tokens"] == [16, 64]
    assert r["collectives"]["executed_per_call"].get("all-reduce", 0) >= 1  # gradients
    assert r["step_time_s"]["flop_bound"] > 0 and r["compile_s"] > 0
    e = r["eval"]
    assert e["topology"] == "v5litepod-1" and e["devices"] == 1 and e["fits"] is True
    assert set(e["programs"]) == {"eval loss", "eval attention"}
    table = format_report(r)
    assert "fits" in table and "yes (headroom" in table and "v5litepod-8" in table
    assert json.loads(json_line(r))["compile_check"]["fits"] is True


@needs_libtpu
def test_flops_apply_loop_trip_counts():
    """Scanned layers are one while loop: XLA's cost analysis counts its body once."""
    unrolled = check_lib.check(base(tiny("unrolled")), "v5e-8")
    scanned = check_lib.check(base(tiny("flops")), "v5e-8")["flops"]
    model = scanned["model_per_step"]
    assert unrolled["flops"]["model_per_step"] == model
    a, b = scanned["compiled_per_step"], unrolled["flops"]["compiled_per_step"]
    assert abs(a / b - 1) < 0.03, (a, b)
    # Beyond the model count: elementwise work, full (masked) attention, the optimizer.
    assert abs(a / model - 1) < 0.06 and abs(b / model - 1) < 0.06, (a, b, model)
    assert scanned["unknown_trip_counts"] == 0
    # The raw cost analysis of the scanned program misses one of its two layers' work.
    assert scanned["cost_analysis_per_chip_per_call"] * 8 < 0.8 * a


@needs_libtpu
def test_batch_that_cannot_fit(oom_report):
    r = oom_report
    assert r["fits"] is False and r["hbm"]["fits"] is False
    h = r["hbm"]
    assert "RESOURCE_EXHAUSTED" in h["compiler_message"]
    assert h["temporaries"] > h["hbm"] > 15 * 2**30  # the compiler's numbers
    line = misfit_line("compile_tiny_f0_e1_s0", r)
    assert line.startswith("run compile_tiny_f0_e1_s0 does not fit: train step needs ")
    assert "GiB per chip of 15.75 GiB on v5litepod-8" in line and "\n" not in line


@needs_libtpu
def test_two_slices_compile_with_the_dcn_axis():
    r = check_lib.check(base(tiny("fits")), "v5e-8", num_slices=2)
    assert r["topology"]["devices"] == 16 and r["topology"]["num_slices"] == 2
    assert r["mesh"]["data"] == 16 and r["mesh_dcn"]["data"] == 2 and r["fits"]
    with pytest.raises(CompileCheckError, match="spans 2 slice"):
        c = base(tiny("fits"))
        c.mesh.dcn.data = 2
        check_lib.check(c, "v5e-8", num_slices=1)


@needs_libtpu
def test_cli_prints_a_table_and_one_json_line():
    cmd = [sys.executable, "-m", "repeat_scaling.compile", f"--config={TINY}:fits",
           "--topology=v5e-8", "--eval_topology=none", "--config.train.batch_size=32"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])["compile_check"]
    assert report["batch_size"] == 32 and report["fits"] and "eval" not in report
    assert any(line.startswith("fits") for line in lines[:-1])
    bad = subprocess.run(cmd[:4] + ["--topology=v5e-3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: unknown --topology='v5e-3'; known accelerator types:")


# -- submit.py --backend=tpu ----------------------------------------------------------
FAKE_GCLOUD = r"""#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
sys.exit(1 if sys.argv[1:3] in (["storage", "cat"], ["compute", "tpus"]) else 0)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    monkeypatch.setenv("REPEAT_SCALING_COMPILE_CACHE", "")  # compile every time here
    (tmp_path / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (tmp_path / "gcloud").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@needs_libtpu
def test_submit_refuses_a_sweep_that_does_not_fit(fake_gcloud, tmp_path):
    """Through submit.py, dry run: the check runs and no VM command is printed or run."""
    cmd = [sys.executable, "launch/submit.py", f"--config={TINY}:oom", "--backend=tpu",
           "--root=gs://bkt/sweep", "--tpu_zone=us-west4-a",
           "--tpu_accelerator_type=v5litepod-8", "--dry_run"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: run compile_tiny_f0_e1_s0 does not fit: train step needs "
    ), proc.stderr
    assert "(2 of 2 runs do not fit)" in err[0]
    assert "# compile check: 2 run(s), 1 distinct program(s) for v5litepod-8" in proc.stdout
    rows = [x.split()[:2] for x in proc.stdout.splitlines() if x.startswith("compile_tiny_")]
    assert rows == [["compile_tiny_f0_e1_s0", "NO"], ["compile_tiny_f10_e10_s0", "NO"]]
    assert "gcloud" not in proc.stdout and fake_gcloud() == []


@needs_libtpu
def test_tpu_backend_checks_before_any_vm(fake_gcloud, tmp_path, oom_report, monkeypatch):
    """Not a dry run: only the results lookup runs before the refusal, no create."""
    from launch.backends import LaunchError, Submission
    from launch.backends.tpu import TpuBackend, TpuOptions
    from repeat_scaling import sweeps

    monkeypatch.setattr(check_lib, "check", lambda *a, **k: oom_report)  # compiled above
    runs = sweeps.expand(tiny("oom"), "gs://bkt/sweep")
    opts = TpuOptions(zone="z", accelerator_type="v5litepod-8", compile_check=True,
                      tarball=str(tmp_path / "code.tgz"), log_dir=str(tmp_path / "logs"))  # fmt: skip
    out = io.StringIO()
    sub = Submission(config_file=TINY, config_arg="oom")
    with pytest.raises(LaunchError, match="^run compile_tiny_f0_e1_s0 does not fit"):
        TpuBackend(opts, out=out).submit(sub, runs)
    assert [c[:2] for c in fake_gcloud()] == [["storage", "cat"]] * 2
    assert not (tmp_path / "code.tgz").exists()


@needs_libtpu
def test_submit_compiles_a_fitting_sweep_once_then_launches(fake_gcloud, tmp_path):
    cmd = [sys.executable, "launch/submit.py", f"--config={TINY}:fits", "--backend=tpu",
           "--root=gs://bkt/sweep", "--tpu_zone=us-west4-a",
           "--tpu_accelerator_type=v5litepod-8", "--dry_run", "--eval_mode=none"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2 run(s), 1 distinct program(s)" in out
    table = [line.split() for line in out.splitlines() if line.startswith("compile_tiny_")]
    assert [row[:2] for row in table] == [["compile_tiny_f0_e1_s0", "yes"],
                                          ["compile_tiny_f10_e10_s0", "yes"]]  # fmt: skip
    assert out.index("compile_tiny_f10_e10_s0 ") < out.index("tpu-vm create")
    assert "--version=v2-alpha-tpuv5-lite" in out  # the v5e runtime, by default


@pytest.mark.skipif(
    not has_cuda_plugin(),
    reason="the CUDA PJRT plugin is not installed (pip install -e '.[compile-gpu]')",
)
def test_gpu_target_compiles_without_a_gpu():
    r = check_lib.check(base(tiny("flops")), "h100x8", eval_topology="default")
    assert r["topology"]["topology"] == "1x1x8" and r["mesh"]["data"] == 8 and r["fits"]
    assert r["hbm"]["hbm"] == int(0.75 * 84978434048)  # jax preallocates 75%
    assert abs(r["flops"]["compiled_over_model"] - 1) < 0.06
    assert r["eval"]["topology"] == "h100x1" and r["eval"]["fits"]


def test_check_runs_caches_reports(tmp_path, monkeypatch):
    """A re-submitted sweep reads its reports back instead of compiling again."""
    calls = []

    def fake_check(config, topology, num_slices=1, eval_topology=None):
        calls.append(topology)
        return {"fits": True, "batch": int(config.train.batch_size)}

    monkeypatch.setattr(check_lib, "check", fake_check)
    runs = [("a", base(tiny("fits"))), ("b", base(tiny("fits"))), ("c", base(tiny("oom")))]
    logs = []
    first = check_lib.check_runs(runs, "v5e-8", cache_dir=str(tmp_path), log=logs.append)
    assert calls == ["v5e-8", "v5e-8"] and first["a"] is first["b"]  # one per program
    again = check_lib.check_runs(runs, "v5e-8", cache_dir=str(tmp_path), log=logs.append)
    assert calls == ["v5e-8", "v5e-8"] and again == first
    assert sum("cached" in line for line in logs) == 2
    check_lib.check_runs(runs, "v4-8", cache_dir=str(tmp_path), log=logs.append)
    assert calls[2:] == ["v4-8", "v4-8"]  # another topology is another program


def test_model_name_override_keeps_the_config_files_changes():
    """--config.model.name=d800m on a config whose file set remat: d800m's shape, remat kept."""
    base = config_files.load(os.path.join(REPO, "configs/hernandez2022.py:paper"))
    assert base.model.name == "d25m" and base.model.remat_policy == "dots_no_batch"
    config = base.copy_and_resolve_references()
    config.model.name, config.model.dropout_rate = "d800m", 0.1  # as config_flags leaves it
    out = apply_model_name(config, {"model.name": "d800m", "model.dropout_rate": 0.1}, base)
    assert (out.model.d_model, out.model.num_decoder_layers) == (1536, 28)
    assert out.model.remat_policy == "dots_no_batch" and out.model.dropout_rate == 0.1
