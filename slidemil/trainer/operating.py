"""The operating point of the kept checkpoint (``checkpoint_best``), chosen on its validation slides
(:mod:`slidemil.evaluation.operating_point`).

After training (and calibration, which changes the probabilities), the best model's validation
probabilities give the threshold on the positive class (index 1 of a binary task) that maximises
balanced accuracy. It is stored as ``operating_point`` in ``checkpoint_best.json``, from where export
copies it into the package manifest and the engine applies it to ``pred_class``. Multi-class runs
and runs without both classes among the validation slides keep argmax (no record). Running it again
(a resumed, finished run) gives the same threshold.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from slidemil.artifacts import checkpoint as ckpt
from slidemil.evaluation.operating_point import choose_operating_point

if TYPE_CHECKING:
    from slidemil.trainer.loop import Trainer

log = logging.getLogger(__name__)

_RECORD_FIELDS = ("schema", "slidemil_version", "files")  # written by save_checkpoint itself


def choose_for_best(trainer: Trainer) -> dict[str, Any] | None:
    """Choose the operating point on the validation slides and write it into ``checkpoint_best`` (rank 0)."""
    if len(trainer.class_names) != 2:
        log.info("operating point: %d classes; the predicted class stays the most probable one",
                 len(trainer.class_names))
        return None
    val = trainer.task.datasets["val"]
    if len(val) == 0:
        log.warning("no validation slides to choose an operating point on; the predicted class stays the most "
                    "probable one")
        return None
    probs = np.stack([row[2] for row in trainer.predict("val")]).astype(np.float64)
    op = choose_operating_point(val.labels, probs, trainer.class_names, 1,
                                "validation slides of the kept checkpoint")
    if op is None:
        log.warning("the validation slides hold one class only: no operating point; the predicted class stays the "
                    "most probable one")
        return None
    if trainer.ctx.is_main:
        _rewrite_best(trainer, op)
    log.info("operating point: %s where p >= %.4f (validation balanced accuracy %.4f; at argmax %.4f)",
             op["class"], op["threshold"], op["val_balanced_accuracy"], op["val_balanced_accuracy_argmax"])
    return op


def _rewrite_best(trainer: Trainer, op: dict[str, Any]) -> None:
    from slidemil.trainer.loop import BEST

    base = trainer.out / BEST
    if not base.with_name(base.name + ".json").is_file() or trainer.best_state is None:
        log.warning("%s does not exist; the operating point is not saved", base)
        return
    meta = {k: v for k, v in ckpt.read_checkpoint_meta(base).items() if k not in _RECORD_FIELDS}
    meta["operating_point"] = op
    with ckpt.deferred_termination():
        ckpt.save_checkpoint(base, trainer.best_state, meta)
