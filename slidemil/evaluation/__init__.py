"""Metrics of slide predictions and their uncertainty, shared by the trainer and the report.

``metrics`` (every scalar metric from one weighted kernel, so a bootstrap interval brackets the very
number the trainer logged), ``stats`` (bootstrap intervals, reliability curves, patient aggregation)
and ``calibration`` (temperature scaling).
"""
