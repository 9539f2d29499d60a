"""``--calibrate``: temperature scaling of the kept checkpoint (Guo et al., 2017).

After training, the best model's logits on the validation slides (at T = 1) give the temperature
that minimises their negative log-likelihood (:func:`slidemil.evaluation.calibration.fit_temperature`).
T goes into the head's ``temperature`` buffer, which divides the logits, so the rewritten
``checkpoint_best`` carries it into ``head.onnx`` on export and every scored probability is
calibrated; ``checkpoint_best.json`` records ``"temperature": T`` at its top level and the
validation ECE and NLL before and after under ``"calibration"``. Dividing by T > 0 never changes
the predicted class. Running it again (a resumed, finished run) refits from T = 1 and gives the same T.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from slidemil.artifacts import checkpoint as ckpt
from slidemil.evaluation.calibration import apply_temperature, fit_temperature, nll
from slidemil.evaluation.metrics import compute_metrics

if TYPE_CHECKING:
    from slidemil.trainer.loop import Trainer

log = logging.getLogger(__name__)

_RECORD_FIELDS = ("schema", "slidemil_version", "files")  # written by save_checkpoint itself


def calibrate_best(trainer: Trainer) -> dict[str, Any] | None:
    """Fit T on the validation slides, put it into the model (and ``trainer.best_state``), rewrite
    ``checkpoint_best`` (rank 0); returns the calibration record, or None without validation slides."""
    val = trainer.task.datasets["val"]
    if len(val) == 0:
        log.warning("--calibrate: no validation slides to fit a temperature on; the head keeps T = 1")
        return None
    trainer.model.set_temperature(1.0)
    logits = np.stack([row[1] for row in trainer.predict("val")]).astype(np.float64)  # (S, C) at T = 1
    t = fit_temperature(logits, val.labels)
    before = calibration_scores(val.labels, logits, 1.0, trainer.class_names)
    after = calibration_scores(val.labels, logits, t, trainer.class_names)
    record = {"temperature": t, "fitted_on": f"{len(val)} validation slides", "val_before": before, "val_after": after}
    trainer.model.set_temperature(t)
    trainer.best_state = trainer.model.checkpoint_state()
    if trainer.ctx.is_main:
        _rewrite_best(trainer, t, record)
    log.info("calibration: T = %.4f on %d validation slides; validation ECE %.4f -> %.4f, NLL %.4f -> %.4f",
             t, len(val), before["ece"], after["ece"], before["nll"], after["nll"])
    return record


def calibration_scores(labels: np.ndarray, logits: np.ndarray, temperature: float,
                       class_names: list[str]) -> dict[str, float]:
    """ECE, Brier score and NLL of ``softmax(logits / T)``."""
    metrics = compute_metrics(labels, apply_temperature(logits, temperature), class_names)
    return {"ece": float(metrics["ece"]), "brier": float(metrics["brier"]),
            "nll": nll(logits, labels, temperature)}


def _rewrite_best(trainer: Trainer, temperature: float, record: dict[str, Any]) -> None:
    from slidemil.trainer.loop import BEST

    base = trainer.out / BEST
    if not base.with_name(base.name + ".json").is_file():
        log.warning("--calibrate: %s does not exist; the temperature is not saved", base)
        return
    assert trainer.best_state is not None
    meta = {k: v for k, v in ckpt.read_checkpoint_meta(base).items() if k not in _RECORD_FIELDS}
    meta.update(trainer.model.checkpoint_meta(trainer.best_state), temperature=temperature, calibration=record)
    with ckpt.deferred_termination():
        ckpt.save_checkpoint(base, trainer.best_state, meta)
