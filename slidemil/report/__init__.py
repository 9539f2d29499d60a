"""Reporting: bootstrap confidence intervals, calibration and patient-level aggregation."""
