"""The doctor's report: one row per check, the verdict, and its table and JSON forms.

Every check is one row (:class:`Check`): a name, a status, a detail and, when the status is not
``ok``, a hint that says what to do. Statuses and the verdict they give:

- ``ok``: present and working as the engine wants it.
- ``info``: a fact, or an optional part this machine does not need (TensorRT without a GPU);
  never changes the verdict.
- ``warn``: the job runs, but slower or at risk (OpenVINO missing on a CPU-only machine, under 10 GB
  free in the output folder, a foundation model's weights not in the local cache).
- ``fail``: the job cannot run as asked (a required library missing, a tampered package, a package
  whose runner does not run here, an output folder that cannot be written).

``DoctorReport.exit_code`` is 0 without warnings or failures, 1 with warnings only, 2 with at least
one failure. No probe may crash the doctor: an exception inside a probe becomes a ``fail`` row named
after it. Nothing here touches the network unless asked (``online=True``, and never under
``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import logging
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slidemil import __version__
from slidemil.atomic import write_json

log = logging.getLogger(__name__)

STATUSES = ("ok", "info", "warn", "fail")
REPORT_SCHEMA = 1
EXIT_OK, EXIT_WARN, EXIT_FAIL = 0, 1, 2


@dataclass(frozen=True)
class Check:
    """One row of the report.

    Attributes:
        section: the group it is shown under (``system``, ``cpu``, ``gpu``, ``backends``, ...).
        name: what was checked.
        status: ``ok``, ``info``, ``warn`` or ``fail``.
        detail: what was found.
        hint: what to do when the status is not ``ok`` (empty otherwise).
        data: the figures behind the detail, for the JSON report.
    """

    section: str
    name: str
    status: str
    detail: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status {self.status!r} is not one of {STATUSES}")


@dataclass
class DoctorReport:
    """All rows of one doctor run and what it was asked about."""

    checks: list[Check]
    context: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many rows have each status."""
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    @property
    def exit_code(self) -> int:
        """0: ready; 1: runs, with warnings; 2: at least one failure (the job cannot run as asked)."""
        counts = self.counts()
        return EXIT_FAIL if counts["fail"] else EXIT_WARN if counts["warn"] else EXIT_OK

    @property
    def verdict(self) -> str:
        """One line: the outcome, what ``score`` would run on here, and the exit code."""
        counts = self.counts()
        plan = self.context.get("plan")
        runs_on = f"; score would run on {plan}" if plan else ""
        if counts["fail"]:
            names = ", ".join(c.name for c in self.checks if c.status == "fail")
            return f"NOT READY: {counts['fail']} failure(s) ({names}){runs_on} (exit 2)"
        if counts["warn"]:
            names = ", ".join(c.name for c in self.checks if c.status == "warn")
            return f"READY WITH WARNINGS: {counts['warn']} warning(s) ({names}){runs_on} (exit 1)"
        return f"READY{runs_on} (exit 0)"

    def find(self, name: str) -> list[Check]:
        """Rows whose name is ``name`` or starts with ``name + ' '``."""
        return [c for c in self.checks if c.name == name or c.name.startswith(name + " ")]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data (what ``--json`` writes)."""
        return {"schema": REPORT_SCHEMA, "slidemil_version": __version__, "context": dict(self.context),
                "exit_code": self.exit_code, "verdict": self.verdict, "counts": self.counts(),
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DoctorReport:
        """Inverse of :meth:`to_dict` (exit code, verdict and counts are recomputed)."""
        checks = [Check(**c) for c in data.get("checks", [])]
        return cls(checks=checks, context=dict(data.get("context", {})))


Probe = Callable[[], Iterable[Check] | Check]


def safe_probe(section: str, name: str, probe: Probe) -> list[Check]:
    """Run ``probe``; an exception becomes one ``fail`` row named ``name`` (the doctor never crashes)."""
    start = time.perf_counter()
    try:
        result = probe()
        rows = [result] if isinstance(result, Check) else list(result)
    except Exception as exc:  # noqa: BLE001 - a probe that breaks is itself a finding
        log.debug("doctor probe %s failed", name, exc_info=True)
        rows = [Check(section, name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}",
                      hint="this part of the installation is broken: reinstall the library it names, or run "
                           "the failing step alone to see the full error")]
    seconds = time.perf_counter() - start
    if seconds > 2.0:
        log.info("doctor: %s took %.1f s", name, seconds)
    return rows


MARKS = {"ok": "ok", "info": "info", "warn": "WARN", "fail": "FAIL"}


def format_report(report: DoctorReport, width: int = 110) -> list[str]:
    """The report as table lines: a header per section, one line per check, its hint below it.

    The last line is the verdict.
    """
    name_w = min(34, max((len(c.name) for c in report.checks), default=10))
    lines = [f"slidemil doctor ({__version__}) on {report.context.get('host', '?')}"]
    asked = [f"{k} {report.context[k]}" for k in ("model", "backbone", "out_dir") if report.context.get(k)]
    if asked:
        lines.append("checking " + ", ".join(asked))
    section = None
    for c in report.checks:
        if c.section != section:
            section = c.section
            lines.append(f"-- {section} " + "-" * max(0, width - len(section) - 4))
        indent = " " * (name_w + 8)
        detail = textwrap.wrap(c.detail, width - name_w - 8) or [""]
        lines.append(f"{MARKS[c.status]:>4}  {c.name:<{name_w}}  {detail[0]}")
        lines += [indent + more for more in detail[1:]]
        if c.hint and c.status != "ok":
            lines += textwrap.wrap(c.hint, width, initial_indent=indent + "-> ", subsequent_indent=indent + "   ")
    lines.append("-" * width)
    lines.append(f"verdict: {report.verdict} [{report.context.get('seconds', '?')} s]")
    return lines


def write_report_json(report: DoctorReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` to ``path`` atomically."""
    write_json(path, report.to_dict())
