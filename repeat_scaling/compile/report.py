"""The compile check's output: the human table of one report, its JSON line, and the
one-line-per-run table and refusal line of a sweep."""

from __future__ import annotations

import json
from typing import Any

from repeat_scaling.compile.topologies import GiB


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_report(r: dict[str, Any]) -> str:
    """The human table of one report."""
    t, h = r["topology"], r["hbm"]
    slices = f" x {t['num_slices']} slices" if t["num_slices"] > 1 else ""
    rows = [
        ("model", r["model"]),
        ("topology", f"{t['accelerator_type']}{slices} ({t['topology']}, {t['devices']} "
                     f"devices, {t['hosts'] * t['num_slices']} hosts)"),
        ("mesh", " ".join(f"{a}={s}" for a, s in r["mesh"].items())
         + ("  (dcn: " + " ".join(f"{a}={s}" for a, s in r["mesh_dcn"].items() if s > 1) + ")"
            if any(s > 1 for s in r["mesh_dcn"].values()) else "")),
        ("batch", f"{r['batch_size']} rows, grad_accum {r['grad_accum']}, "
                  f"{r['steps_per_call']} step(s) per call"),
        ("HBM per chip: arguments", gib(h["arguments"])),
        ("  temporaries", gib(h["temporaries"])),
        ("  outputs (not aliased)", gib(h["outputs"])),
        ("  generated code", gib(h["generated_code"])),
        ("  total", f"{gib(h['total'])} of {gib(h['hbm'])} usable"),
        ("fits", ("yes" if h["fits"] else "NO")
         + (f" (headroom {gib(h['headroom'])})" if h["headroom"] is not None else "")),
    ]  # fmt: skip
    if h.get("compiler_message"):
        rows.append(("compiler", h["compiler_message"]))
    f = r.get("flops", {})
    if "compiled_per_step" in f:
        ratio = f["compiled_over_model"]
        rows += [
            ("FLOPs per step: compiled", _sci(f["compiled_per_step"])
             + (f" ({f['unknown_trip_counts']} loop(s) counted once)"
                if f["unknown_trip_counts"] else "")),
            ("  model (3 x forward)", _sci(f["model_per_step"])
             + (f" (compiled / model = {ratio:.3f})" if ratio else "")),
        ]  # fmt: skip
        st = r["step_time_s"]
        est = st["compiler_estimate"]
        rows.append(("step time: compiler", "-" if est is None else f"{est:.4f} s"))
        rows.append(("  FLOP-bound at peak", f"{st['flop_bound']:.4f} s"))
        coll = r["collectives"]["executed_per_call"]
        rows.append(
            (
                "collectives per call",
                ", ".join(f"{k} {v}" for k, v in sorted(coll.items())) or "none",
            )
        )
    rows.append(("compile time", f"{r['compile_s']:.1f} s"))
    if "eval" in r:
        e = r["eval"]
        eh = e["hbm"]
        rows.append(
            (f"evaluator ({e['topology']})",
             f"{gib(eh['total'])} of {gib(eh['hbm'])}: " + ("fits" if e["fits"] else "does NOT fit")
             + f" ({e['compile_s']:.1f} s)")
        )  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def json_line(r: dict[str, Any]) -> str:
    return json.dumps({"compile_check": r}, sort_keys=False, default=str)


def runs_table(reports: dict[str, dict[str, Any]]) -> str:
    """One line per run: fits, per-chip HBM (train; evaluator when checked)."""
    name_w = max([len(n) for n in reports] + [3])
    lines = [f"{'run':<{name_w}}  fits  {'HBM/chip':>20}  {'evaluator':>20}"]
    for name, r in reports.items():
        h = r["hbm"]
        train = f"{gib(h['total'])}/{h['hbm'] / GiB:.2f}"
        ev = "-"
        if "eval" in r:
            eh = r["eval"]["hbm"]
            ev = f"{gib(eh['total'])}/{eh['hbm'] / GiB:.2f}"
        lines.append(f"{name:<{name_w}}  {'yes' if r['fits'] else 'NO':<4}  {train:>20}  {ev:>20}")
    return "\n".join(lines)


def misfit_line(name: str, r: dict[str, Any]) -> str:
    """One line naming a run that does not fit and the numbers."""
    t = r["topology"]
    parts = []
    for what, h in (("train step", r["hbm"]), ("evaluator", r.get("eval", {}).get("hbm"))):
        if h is None or h["fits"]:
            continue
        need = gib(h["total"]) if h["total"] is not None else "more"
        where = t["accelerator_type"] if what == "train step" else r["eval"]["topology"]
        extra = f" [{h['compiler_message']}]" if h.get("compiler_message") else ""
        parts.append(f"{what} needs {need} per chip of {gib(h['hbm'])} on {where}{extra}")
    return f"run {name} does not fit: " + "; ".join(parts)
