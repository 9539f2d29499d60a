"""Which of several initialisations a run keeps (``model.inits`` > 1, ``model.init_choice``).

A head trained on a few dozen slides can find a lesion of a few tiles from one initialisation and miss it
from the next: the run that misses learns its training slides by slide-wide differences instead (stain,
texture), and ends confidently wrong on slides it has not seen. ``--inits K`` trains K heads side by side
on the same split (:class:`slidemil.models.ensemble.EnsembleHead`; each learns exactly as it would
alone) and after training:

- ``val_loss`` (default): keeps the head with the lowest validation loss at the kept epoch. A head that
  memorised is confidently wrong on some validation slides, and its loss shows it even on eight slides,
  where a ranking metric cannot tell heads apart (README, "Small lesions").
- ``average``: keeps all of them as one head that averages them (the geometric mean of their
  probabilities).

With ``val_loss`` and ``model.slide_contrast: auto`` (the default for ABMIL) K plain heads and K slide-contrast
heads (:attr:`slidemil.models.mil.HeadConfig.slide_contrast`) train side by side, and the same rule chooses among
all 2K: a contrast head where the plain ones learnt the patients' slide-wide look instead of a small lesion, a
plain head where the class itself is slide-wide (a subtype) and the contrast heads have little to go on.

With ``val_loss`` the chosen head becomes ``checkpoint_best`` (a single head: its ``head_config`` has
``ensemble: 1``, its ``metrics`` are its own validation figures) and its record says which one and why
(``inits``, with each head's kind); the kept epoch's weights of every
head stay in ``checkpoint_inits`` so that a resumed, finished run chooses again from the same heads.
Calibration and the operating point follow on the kept head.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slidemil.artifacts import checkpoint as ckpt

if TYPE_CHECKING:
    from slidemil.trainer.loop import Trainer

log = logging.getLogger(__name__)

_RECORD_FIELDS = ("schema", "slidemil_version", "files")  # written by save_checkpoint itself


def choose_init(trainer: Trainer) -> dict[str, Any] | None:
    """Keep one head of an ensemble trained from several initialisations (``init_choice: val_loss``), in the
    model and in ``checkpoint_best`` (rank 0); returns the record (None: nothing to choose)."""
    model_cfg = trainer.cfg.model
    if model_cfg.inits < 2 or model_cfg.init_choice == "average":
        return None
    if len(trainer.task.datasets["val"]) == 0:
        log.warning("%d heads but no validation slides to choose one on: the run keeps their average",
                    len(model_cfg.contrast_per_head()))
        return None
    losses = trainer.member_losses("val")
    kept = int(losses.argmin())
    ensemble_config = trainer.model.mil_head().config
    assert ensemble_config is not None
    contrast = ensemble_config.contrast_per_member()
    record = {"n": len(losses), "kept": kept, "rule": "lowest validation loss at the kept epoch",
              "val_loss": [round(float(v), 6) for v in losses], "slide_contrast": list(contrast)}
    all_heads = trainer.best_state
    head = trainer.model.keep_member(kept)
    assert head.config is not None
    trainer.task.meta["head_config"] = head.config.to_dict()
    trainer.best_state = trainer.model.checkpoint_state()
    metrics, _ = trainer.evaluate("val")  # the kept head's own validation figures (every rank takes part)
    if trainer.ctx.is_main:
        _save(trainer, all_heads, record, metrics)
    log.info("initialisations: kept head %d of %d%s (validation loss %s)", kept, len(losses),
             " (a slide-contrast head)" if contrast[kept] else "",
             ", ".join(f"{v:.3f}{' (contrast)' if c else ''}" for v, c in zip(losses, contrast)))
    return record


def _save(trainer: Trainer, all_heads: Any, record: dict[str, Any], metrics: dict[str, Any] | None) -> None:
    from slidemil.trainer.loop import BEST, INITS

    base = trainer.out / BEST
    if not base.with_name(base.name + ".json").is_file() or all_heads is None or trainer.best_state is None:
        log.warning("%s does not exist; the choice of initialisation is not saved", base)
        return
    meta = {k: v for k, v in ckpt.read_checkpoint_meta(base).items() if k not in _RECORD_FIELDS}
    with ckpt.deferred_termination():
        if not (trainer.out / f"{INITS}.json").is_file():
            ckpt.save_checkpoint(trainer.out / INITS, all_heads, meta)  # first: a kill here loses nothing
        meta.update(head_config=trainer.task.meta["head_config"], inits=record, metrics=metrics or {})
        ckpt.save_checkpoint(base, trainer.best_state, meta)
