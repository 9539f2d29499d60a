"""bench/init_choice.py: each rule takes its head from the validation figures alone."""

from __future__ import annotations

import pandas as pd

from tests.bench_modules import bench_module


def test_each_rule_keeps_the_head_its_validation_figures_name() -> None:
    with bench_module("init_choice") as bench:
        frame = pd.DataFrame({"head": range(5), "val_loss": [2.0, 0.1, 0.5, 0.05, 1.0],
                              "val_auc": [0.5, 1.0, 1.0, 0.9, 1.0], "test_auc": [0.3, 1.0, 0.9, 0.8, 0.5]})
        frame.attrs["average_auc"] = 0.7
        got = bench.rules(frame)
    assert got["lowest validation loss of the first 3"] == 1.0  # head 1 of heads 0-2
    assert got["lowest validation loss of 5 (default)"] == 0.8  # head 3, though head 1 tests better
    assert got["best validation AUC (ties: loss)"] == 1.0  # heads 1, 2, 4 tie at 1.0; head 1 has the lowest loss
    assert got["the heads averaged"] == 0.7
