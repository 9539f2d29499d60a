"""`slidemil doctor`: what this machine can run, and how fast, before a long job is started.

The probes of the machine (:mod:`slidemil.doctor.system`) and of the job (:mod:`slidemil.doctor.model`:
a model package, a backbone's weights) each give rows of the report (:mod:`slidemil.doctor.report`).
"""

from __future__ import annotations

import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slidemil.doctor.report import Check, DoctorReport, Probe, safe_probe

log = logging.getLogger(__name__)


def run_doctor(out_dir: Path | None = None, model: Path | None = None, backbone: str | None = None,
               online: bool = False) -> DoctorReport:
    """Check this machine for a slidemil job; never raises for what it finds.

    Args:
        out_dir: the output folder the job will write to (free space, writable); None skips it.
        model: a model package: it must load (files, checksums, schema), and the runner ``score``
            would pick here must run one small batch.
        backbone: a backbone name (``uni``, ``resnet50_trunc``, ``hf-hub:<repo>``): are its pretrained
            weights in the local Hugging Face cache?
        online: also ask the Hugging Face hub whether the backbone's repository is reachable
            (skipped under ``HF_HUB_OFFLINE``; short timeout).

    Returns:
        The report; ``report.exit_code`` and ``report.verdict`` sum it up.
    """
    start = time.perf_counter()
    facts: dict[str, Any] = {}
    checks: list[Check] = []
    for section, name, probe in _probe_specs(facts, out_dir, model, backbone, online, checks):
        checks += safe_probe(section, name, probe)
    context = {"created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
               "host": platform.node(), "out_dir": str(out_dir) if out_dir else None,
               "model": str(model) if model else None, "backbone": backbone, "online": online,
               "plan": facts.get("plan"), "seconds": round(time.perf_counter() - start, 2)}
    return DoctorReport(checks=checks, context=context)


def _probe_specs(facts: dict[str, Any], out_dir: Path | None, model: Path | None, backbone: str | None,
                 online: bool, checks: list[Check]) -> list[tuple[str, str, Probe]]:
    """The probes to run; a probe module that does not even import becomes a ``fail`` row in ``checks``."""
    specs: list[tuple[str, str, Probe]] = []
    try:
        from slidemil.doctor import system
        specs += system.probes(facts, out_dir)
        if model is not None or backbone is not None:  # loads timm and the exporter's modules: only when asked
            from slidemil.doctor import model as model_probes
            specs += model_probes.probes(facts, model, backbone, online)
    except Exception as exc:  # noqa: BLE001 - a broken installation is the finding
        log.debug("doctor probes do not import", exc_info=True)
        checks.append(Check("system", "slidemil import", "fail", f"slidemil's own modules do not import: "
                            f"{type(exc).__name__}: {exc}", hint="reinstall slidemil (pip install -e . in the "
                            "checkout) and the library the message names"))
    return specs


