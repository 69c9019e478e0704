"""JUnit XML for CI systems: each gate, parity check and stage becomes a test case.

No torch, no third-party XML library: xml.etree from the standard library. The layout is the
common denominator CI systems read (Jenkins, GitLab, GitHub test reporters):
<testsuites><testsuite name tests failures skipped time><testcase classname name time>
[<failure message type>text</failure> | <skipped message/>]</testcase>...</testsuite></testsuites>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .report import atomic_write_text


@dataclass
class Case:
    classname: str
    name: str
    seconds: float = 0.0
    failure: str | None = None  # message of a failure; None passes
    skipped: str | None = None
    output: str | None = None


@dataclass
class Suite:
    name: str
    cases: list[Case] = field(default_factory=list)


def to_xml(suites: list[Suite], name: str = "kvp") -> str:
    root = ET.Element("testsuites", name=name)
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for s in suites:
        failures = sum(c.failure is not None for c in s.cases)
        skipped = sum(c.skipped is not None and c.failure is None for c in s.cases)
        el = ET.SubElement(root, "testsuite", name=s.name, tests=str(len(s.cases)), failures=str(failures),
                           errors="0", skipped=str(skipped), time=f"{sum(c.seconds for c in s.cases):.3f}")
        totals["tests"] += len(s.cases)
        totals["failures"] += failures
        totals["skipped"] += skipped
        for c in s.cases:
            tc = ET.SubElement(el, "testcase", classname=c.classname, name=c.name, time=f"{c.seconds:.3f}")
            if c.failure is not None:
                f = ET.SubElement(tc, "failure", message=c.failure, type="GateFailed")
                f.text = c.failure
            elif c.skipped is not None:
                ET.SubElement(tc, "skipped", message=c.skipped)
            if c.output:
                ET.SubElement(tc, "system-out").text = c.output
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | Path, suites: list[Suite], name: str = "kvp") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, to_xml(suites, name))
    return path


def gate_cases(gates: list[dict], classname: str = "gates") -> list[Case]:
    """One case per evaluated gate and metric key (a gate with a wildcard gives one per key)."""
    cases = []
    for g in gates:
        name = g["gate"] if "*" not in g["gate"] else f"{g['gate']} [{g['key']}]"
        failure = None
        if not g["ok"]:
            failure = (f"gate {g['gate']} failed: {g['reason']}" if g["value"] is None
                       else f"gate {g['gate']} failed: measured {g['key']} = {g['value']:g}")
        cases.append(Case(classname, name, failure=failure))
    return cases


def report_suites(payload: dict, label: str = "validate") -> list[Suite]:
    """Suites from a validation report payload (ONNX or Core ML): parity checks, Core ML checks, gates."""
    suites = []
    parity = payload.get("results", {}).get("parity", {})
    if parity:
        cases = []
        for v, r in parity.items():
            for c in r["checks"]:
                ok = c["ok"]
                cases.append(Case(f"{label}.parity.{v}", f"{c['graph']} {c['metric']}",
                                  failure=None if ok else f"{v} {c['graph']} {c['metric']} = {c['value']:g} "
                                  f"exceeds the limit {c['limit']:g}"))
        suites.append(Suite(f"{label}.parity", cases))
    coreml = payload.get("linux_checks")
    if isinstance(coreml, dict) and coreml:
        cases = []
        for v, c in coreml.items():
            why = "; ".join(c.get("spec", {}).get("problems", [])) or "numeric or weight check failed"
            cases.append(Case(f"{label}.coreml", v, failure=None if c.get("ok") else f"Core ML checks of {v}: {why}"))
        mac = payload.get("macos", {})
        if not mac.get("measured", True):
            cases.append(Case(f"{label}.coreml", "macOS measurements", skipped=mac.get("reason") or "not measured"))
        suites.append(Suite(f"{label}.coreml", cases))
    if payload.get("gates"):
        suites.append(Suite(f"{label}.gates", gate_cases(payload["gates"], f"{label}.gates")))
    return suites
