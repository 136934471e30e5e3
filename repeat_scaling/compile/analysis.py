"""Reading a compiled program: per-chip memory against the chip's HBM, FLOPs with loop
trip counts applied, collectives (from the optimised HLO text)."""

from __future__ import annotations

import re
from typing import Any

from repeat_scaling.compile.programs import Program, TrainSetup
from repeat_scaling.compile.topologies import Topology

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_OOM_TEMPS = re.compile(
    r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE)


def _num(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit])


def memory_report(prog: Program, topo: Topology) -> dict[str, Any]:
    """Per-chip HBM of one program against the chip's usable HBM."""
    limit = topo.usable_hbm_bytes
    if prog.compiled is None:
        out: dict[str, Any] = {
            "arguments": prog.argument_bytes, "temporaries": None, "outputs": None,
            "generated_code": None, "total": None, "hbm": limit, "fits": False,
            "headroom": None, "compiler_message": prog.oom,
        }  # fmt: skip
        m = _OOM_TEMPS.search(prog.oom or "")
        if m:
            out["temporaries"] = _num(*m.group(1, 2))
            out["hbm"] = _num(*m.group(3, 4))
            out["total"] = out["temporaries"] + prog.argument_bytes
        m = _OOM_USED.search(prog.oom or "")
        if m:
            out["total"], out["hbm"] = _num(*m.group(1, 2)), _num(*m.group(3, 4))
        if out["total"] is not None:
            out["headroom"] = out["hbm"] - out["total"]
        return out
    ma = prog.compiled.memory_analysis()
    args = int(ma.argument_size_in_bytes)
    temps = int(ma.temp_size_in_bytes)
    outputs = int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)
    code = int(ma.generated_code_size_in_bytes)
    total = args + temps + outputs + code
    return {
        "arguments": args, "temporaries": temps, "outputs": outputs, "generated_code": code,
        "total": total, "hbm": limit, "fits": total <= limit, "headroom": limit - total,
    }  # fmt: skip


_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")  # fmt: skip
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


class HloProgram:
    """The optimised HLO text of one compiled program, split into computations.

    ``flops()`` is XLA's own cost analysis (HloCostAnalysis, run by jaxlib on the CPU
    client over the parsed TPU module: the same count as the compiled program's
    ``cost_analysis()``) with each ``while`` body costed on its own and multiplied by its
    trip count. The trip count comes from ``known_trip_count`` when the compiler wrote it,
    else from the loop condition (``i < N`` with i from 0: what ``lax.scan`` and
    ``fori_loop`` produce); a loop whose count cannot be read counts once and is listed in
    ``unknown_trip_counts``.
    """

    def __init__(self, text: str):
        # stack_frame_id refers to a table the text printer leaves out: drop it.
        text = re.sub(r",? ?stack_frame_id=\d+", "", text)
        self.comps: dict[str, list[str]] = {}
        self.order: list[str] = []
        self.entry = ""
        current = None
        for line in text.splitlines():
            if current is None:
                m = _COMP_HEAD.match(line)
                if m:
                    current = m.group(2)
                    self.comps[current], self.order = [line], self.order + [current]
                    if m.group(1):
                        self.entry = current
                continue
            self.comps[current].append(line)
            if line.startswith("}"):
                current = None
        self._cost: dict[str, float] = {}
        self.unknown_trip_counts: list[str] = []

    # -- structure -------------------------------------------------------------------
    def _calls(self, name: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """(computations called other than as loops, (while line, cond, body) of loops)."""
        subs, loops = [], []
        for line in self.comps[name][1:]:
            m = _WHILE.search(line)
            if m:
                loops.append((line, m.group(1), m.group(2)))
                continue
            found = _CALLED.findall(line)
            b = _BRANCHES.search(line)
            if b:
                found += [s.strip().lstrip("%") for s in b.group(1).split(",") if s.strip()]
            subs += [s for s in found if s in self.comps]
        return subs, loops

    def trip_count(self, line: str, cond: str) -> int | None:
        m = _TRIP.search(line)
        if m:
            return int(m.group(1))
        text, todo, seen = [], [cond], set()
        while todo:  # the condition and what it calls (a fused compare)
            c = todo.pop()
            if c in seen or c not in self.comps:
                continue
            seen.add(c)
            text += self.comps[c]
            todo += self._calls(c)[0]
        body = "\n".join(text)
        consts = {int(v) for v in re.findall(r"s(?:32|64)\[\]\S* constant\((\d+)\)", body)}
        if len(consts) == 1 and "direction=LT" in body:
            return consts.pop()
        if len(consts) == 1 and "direction=GT" in body:  # N > i
            return consts.pop()
        return None

    def _loops(self, name: str, seen: set[str] | None = None) -> list[tuple[str, str, str]]:
        """The loops of ``name`` and of what it calls, not those nested in other loops."""
        seen = set() if seen is None else seen
        subs, loops = self._calls(name)
        for s in subs:
            if s not in seen:
                seen.add(s)
                loops += self._loops(s, seen)
        return loops

    # -- FLOPs -------------------------------------------------------------------------
    def _module_cost(self, name: str) -> float:
        """XLA's cost analysis FLOPs of computation ``name`` (loops counted once)."""
        if name in self._cost:
            return self._cost[name]
        import jax
        from jax._src.lib import _jax
        from jaxlib import _hlo

        parts = []
        for n in self.order:
            if n == self.entry and n != name:
                continue
            lines = list(self.comps[n])
            head = lines[0].removeprefix("ENTRY ")
            lines[0] = ("ENTRY " + head) if n == name else head
            parts.append("\n".join(lines))
        module = _hlo.hlo_module_from_text("HloModule check\n\n" + "\n\n".join(parts))
        client = jax.devices("cpu")[0].client
        cost = _jax.hlo_module_cost_analysis(client, module)
        self._cost[name] = float(cost.get("flops", 0.0))
        return self._cost[name]

    def flops(self, name: str | None = None) -> float:
        """FLOPs of one execution of ``name`` (default: the entry) with trip counts."""
        name = name or self.entry
        total = self._module_cost(name)
        for line, cond, body in self._loops(name):
            n = self.trip_count(line, cond)
            if n is None:
                self.unknown_trip_counts.append(body)
                continue
            total += n * self.flops(body) - self._module_cost(body)
        return total

    # -- collectives -------------------------------------------------------------------
    def collectives(self, name: str | None = None, executed: bool = True) -> dict[str, int]:
        """Collective ops by kind in ``name`` and what it calls; with ``executed``, each
        counted once per execution (loop bodies times their trip count)."""
        name = name or self.entry
        counts: dict[str, int] = {}

        def add(other: dict[str, int], times: int = 1) -> None:
            for k, v in other.items():
                counts[k] = counts.get(k, 0) + v * times

        for line in self.comps[name][1:]:
            m = _COLLECTIVE.search(line)
            if m and " = " in line:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        subs, loops = self._calls(name)
        for s in subs:
            add(self.collectives(s, executed))
        for line, cond, body in loops:
            n = self.trip_count(line, cond) if executed else 1
            add(self.collectives(body, executed), n or 1)
        return counts


def flops_report(prog: Program, setup: TrainSetup, chips: int, peak_tflops: float) -> dict:
    """Compiled FLOPs per train step (trip counts applied) beside the model's."""
    hlo = HloProgram(prog.compiled.as_text())
    n = setup.steps_per_call
    per_chip = hlo.flops() / n
    compiled = per_chip * chips
    cost = prog.compiled.cost_analysis() or {}  # None for the CUDA plugin's programs
    raw, optimal = cost.get("flops"), cost.get("optimal_seconds")
    model = setup.model_flops_per_step
    return {
        "flops": {
            "compiled_per_step": compiled,
            "compiled_per_chip_per_step": per_chip,
            "model_per_step": model,
            "compiled_over_model": compiled / model if model else None,
            "cost_analysis_per_chip_per_call": raw,
            "unknown_trip_counts": len(hlo.unknown_trip_counts),
        },
        "step_time_s": {
            "compiler_estimate": optimal / n if optimal and optimal > 0 else None,
            "flop_bound": per_chip / (peak_tflops * 1e12),
        },
        "collectives": {
            "in_program": hlo.collectives(executed=False),
            "executed_per_call": hlo.collectives(executed=True),
        },
    }
