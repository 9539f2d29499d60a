"""`slidemil doctor`: checks of the machine and the job before a long run (see :mod:`slidemil.doctor.run`)."""

from slidemil.doctor.report import Check, DoctorReport, format_report, write_report_json
from slidemil.doctor.run import run_doctor

__all__ = ["Check", "DoctorReport", "format_report", "run_doctor", "write_report_json"]
