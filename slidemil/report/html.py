"""The report page: one static HTML file with inline CSS and vanilla JS, no network.

Plots and thumbnails are files beside the page (``plots/``, ``thumbs/``); per-slide outputs of a
scoring run (full heatmap, top-k folder, GeoJSON) are linked by relative paths. The gallery is
rendered in HTML (it reads without JS); the script only filters and sorts the cards and keeps the
view in the URL fragment (``#pred=tumour&correct=wrong``), so a view can be bookmarked.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from slidemil.atomic import atomic_path
from slidemil.engine.heatmap import COLORBAR_PX, TITLE_PX
from slidemil.report.evaluate import HEADLINE, LOWER_IS_BETTER
from slidemil.report.html_assets import PAGE_CSS, PAGE_JS

log = logging.getLogger(__name__)

THUMB_PX = 256


@dataclass(frozen=True)
class Plot:
    """A plot of the page: ``stem`` is its path relative to the page, without suffix."""

    title: str
    stem: str
    caption: str = ""
    wide: bool = False  # several panels side by side


@dataclass
class Card:
    """One slide of the gallery; paths are relative to the page (None when absent)."""

    slide_id: str
    probs: Sequence[float | None]
    pred: str = ""
    truth: str | None = None
    status: str = "ok"
    error: str = ""
    thumb: str | None = None
    thumb_size: tuple[int, int] | None = None  # (width, height)
    heatmap: str | None = None
    topk: str | None = None
    geojson: str | None = None
    viewer: str | None = None  # deep-zoom page (slidemil.report.viewer)
    extra: str = ""  # e.g. "fold 2"

    @property
    def prob(self) -> float | None:
        finite = [p for p in self.probs if p is not None]
        return max(finite) if finite else None

    @property
    def correct(self) -> str:
        if self.status != "ok":
            return "failed"
        if self.truth is None:
            return "unlabelled"
        return "correct" if self.truth == self.pred else "wrong"


@dataclass
class ReportPage:
    """Everything the page shows; sections without content are left out."""

    title: str
    kind: str
    source: str
    class_names: list[str]
    metrics: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (heading, evaluate result)
    plots: list[Plot] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    cv_summary: pd.DataFrame | None = None
    cards: list[Card] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # file name -> JSON object
    notes: list[str] = field(default_factory=list)


# -- thumbnails --------------------------------------------------------------------------------
def make_thumbnail(src: Path, dst: Path, max_px: int = THUMB_PX, crop_overlay: bool = True) -> tuple[int, int]:
    """Write a JPEG thumbnail of ``src`` (at most ``max_px`` a side) unless ``dst`` is newer.

    With ``crop_overlay`` the title strip and colour bar of an ``overlay_png`` image are cut off.

    Returns:
        The thumbnail's (width, height).
    """
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        img = cv2.imread(str(dst))
        if img is not None:
            return img.shape[1], img.shape[0]
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {src}")
    h, w = img.shape[:2]
    if crop_overlay and h > TITLE_PX + 16 and w > COLORBAR_PX + 16:
        img = img[TITLE_PX:, : w - COLORBAR_PX]
    scale = min(1.0, max_px / max(img.shape[:2]))
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA) if scale < 1 else img
    ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 82])
    if not ok:
        raise OSError(f"cannot encode a thumbnail of {src}")
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data.tobytes())
    return size


def make_thumbnails(jobs: Sequence[tuple[Path, Path]], workers: int = 4) -> list[tuple[int, int] | None]:
    """Thumbnails of many images in threads (OpenCV releases the GIL); None where one failed."""
    def one(job: tuple[Path, Path]) -> tuple[int, int] | None:
        try:
            return make_thumbnail(*job)
        except OSError as exc:
            log.warning("no thumbnail for %s: %s", job[0], exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, jobs))


# -- HTML pieces -------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def href(path: str) -> str:
    """A relative path as a URL (each part percent-encoded, slashes kept)."""
    return quote(path.replace(os.sep, "/"), safe="/")


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "<td>n/a</td><td></td>"
    ci = "" if entry.get("low") is None else f"{_num(entry['low'])} &ndash; {_num(entry['high'])}"
    return f"<td class='num'>{_num(entry.get('value'))}</td><td class='ci'>{ci}</td>"


def metrics_html(heading: str, result: dict[str, Any]) -> str:
    """Headline metrics, per-class table, confusion matrix and the slides left out, of one result."""
    m, names = result["metrics"], result["class_names"]
    unit = "patients" if result.get("by") == "patient" else "slides"
    keys = [*HEADLINE, *(f"auc_{c}" for c in names if f"auc_{c}" in m)]
    rows = "".join(f"<tr><th>{esc(k.replace('_', ' '))}{' &darr;' if k in LOWER_IS_BETTER else ''}</th>{_ci(m.get(k))}</tr>"
                   for k in keys)
    per_class = "".join(
        f"<tr><th>{esc(c)}</th><td class='num'>{result['class_counts'][c]}</td>"
        + "".join(_ci(m.get(f"{k}_{c}")) for k in ("precision", "recall", "f1")) + "</tr>" for c in names)
    head = "".join(f"<th>{esc(c)}</th>" for c in names)
    cm = "".join(f"<tr><th>{esc(c)}</th>" + "".join(f"<td class='num'>{v}</td>" for v in row) + "</tr>"
                 for c, row in zip(names, result["confusion_matrix"]))
    interval = esc(result.get("interval", ""))
    if result.get("n_boot"):
        interval += f", {result['n_boot']} resamples, seed {result.get('seed', 0)}"
    return f"""
<h3>{esc(heading)}</h3>
<p class="muted">{result['n']} {unit}; interval: {interval}; &darr; lower is better.</p>
<div class="tables">
<table class="metrics"><thead><tr><th>metric</th><th>value</th><th>95% CI</th></tr></thead><tbody>{rows}</tbody></table>
<table class="metrics"><thead><tr><th>class</th><th>n</th><th>precision</th><th></th><th>recall</th><th></th>
<th>F1</th><th></th></tr></thead><tbody>{per_class}</tbody></table>
<table class="metrics confusion"><caption>confusion matrix (rows true, columns predicted)</caption>
<thead><tr><th></th>{head}</tr></thead><tbody>{cm}</tbody></table>
</div>{_left_out_html(result)}"""


def _left_out_html(result: dict[str, Any]) -> str:
    miss, failed = result.get("missing", {}), result.get("failed", [])
    items = []
    if miss.get("unlabelled"):
        items.append(f"<li>scored but not in the label table ({len(miss['unlabelled'])}): "
                     f"{esc(', '.join(miss['unlabelled']))}</li>")
    if miss.get("unscored"):
        items.append(f"<li>labelled but not scored ({len(miss['unscored'])}): {esc(', '.join(miss['unscored']))}</li>")
    if failed:
        items.append(f"<li>failed to score ({len(failed)}): "
                     + esc("; ".join(f"{f['slide_id']} ({f['error'] or f['status']})" for f in failed)) + "</li>")
    return f"<div class='warn'><b>Left out of the metrics</b><ul>{''.join(items)}</ul></div>" if items else ""


def plots_html(plots: Sequence[Plot]) -> str:
    figures = "".join(
        f"<figure{' class=wide' if p.wide else ''}><img src='{href(p.stem)}.svg' alt='{esc(p.title)}' loading='lazy'>"
        f"<figcaption><b>{esc(p.title)}</b> {esc(p.caption)} <a href='{href(p.stem)}.png'>PNG</a> "
        f"<a href='{href(p.stem)}.svg'>SVG</a></figcaption></figure>" for p in plots)
    return f"<div class='plots'>{figures}</div>"


def calibration_html(cal: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{k.upper() if k != 'brier' else 'Brier'}</th><td class='num'>{_num(cal['before'][k])}</td>"
                   f"<td class='num'>{_num(cal['after'][k])}</td></tr>" for k in ("ece", "nll", "brier"))
    return (f"<p>Temperature T = {_num(cal['temperature'])} ({esc(cal['source'])}); "
            f"evaluated on {esc(cal.get('evaluated_on', 'the test slides'))}.</p>"
            f"<table class='metrics'><thead><tr><th></th><th>before</th><th>after</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def cv_html(summary: pd.DataFrame) -> str:
    folds = [c for c in summary.columns if str(c).startswith("fold_")]
    head = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in folds)
    body = "".join(
        f"<tr><th>{esc(r['metric'])}</th><td class='num'>{_num(r['mean'])} &plusmn; {_num(r['std'])}</td>"
        + "".join(f"<td class='num'>{_num(r[c])}</td>" for c in folds) + "</tr>"
        for r in summary.to_dict("records") if r["metric"] != "n" and not str(r["metric"]).startswith("acc_"))
    return (f"<table class='metrics'><thead><tr><th>metric</th><th>mean &plusmn; std</th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def card_html(card: Card, class_names: Sequence[str]) -> str:
    probs = ",".join("" if p is None else f"{p:.4f}" for p in card.probs)
    attrs = (f"data-id='{esc(card.slide_id)}' data-pred='{esc(card.pred)}' data-truth='{esc(card.truth or '')}' "
             f"data-correct='{card.correct}' data-prob='{'' if card.prob is None else f'{card.prob:.4f}'}' "
             f"data-probs='{probs}'")
    if card.thumb:
        w, h = card.thumb_size or (THUMB_PX, THUMB_PX)
        img = (f"<img src='{href(card.thumb)}' width='{w}' height='{h}' loading='lazy' decoding='async' "
               f"alt='heatmap of {esc(card.slide_id)}'>")
        target = card.viewer or card.heatmap
        image = f"<a href='{href(target)}'>{img}</a>" if target else img
    else:
        image = f"<div class='nothumb'>{'scoring failed' if card.status != 'ok' else 'no heatmap'}</div>"
    if card.status != "ok":
        verdict = f"<span class='badge failed' title='{esc(card.error)}'>failed</span>"
        line = f"<div class='err'>{esc(card.error or card.status)}</div>"
    else:
        badge = {"correct": "&#10003; correct", "wrong": "&#10007; wrong", "unlabelled": "no label"}[card.correct]
        verdict = f"<span class='badge {card.correct}'>{badge}</span>"
        line = (f"<div><b>{esc(card.pred)}</b> {_num(card.prob, 2)}"
                + (f" &middot; true <b>{esc(card.truth)}</b>" if card.truth is not None else "") + "</div>")
    bars = "".join(f"<span title='{esc(c)} {_num(p, 3)}' style='width:{0 if p is None else 100 * p:.1f}%' "
                   f"class='c{i % 10}'></span>" for i, (c, p) in enumerate(zip(class_names, card.probs)))
    links = " ".join(f"<a href='{href(path)}'>{label}</a>" for label, path in
                     (("viewer", card.viewer), ("heatmap", card.heatmap), ("top-k tiles", card.topk),
                      ("GeoJSON", card.geojson)) if path)
    return (f"<div class='card {card.correct}' {attrs}>{image}<div class='meta'>"
            f"<div class='sid' title='{esc(card.slide_id)}'>{esc(card.slide_id)} {verdict}</div>{line}"
            f"<div class='bar'>{bars}</div><div class='links'>{links}"
            f"{' &middot; ' + esc(card.extra) if card.extra else ''}</div></div></div>")


def gallery_html(cards: Sequence[Card], class_names: Sequence[str]) -> str:
    options = "".join(f"<option value='{esc(c)}'>{esc(c)}</option>" for c in class_names)
    sorts = "".join(f"<option value='p{i}-desc'>P({esc(c)}) high &rarr; low</option>" for i, c in enumerate(class_names))
    legend = " ".join(f"<span class='key c{i % 10}'></span>{esc(c)}" for i, c in enumerate(class_names))
    return f"""
<div class="controls" id="gallery-controls">
 <label>predicted <select id="f-pred"><option value="all">all</option>{options}</select></label>
 <label>true <select id="f-truth"><option value="all">all</option>{options}</select></label>
 <label>result <select id="f-correct"><option value="all">all</option><option value="correct">correct</option>
  <option value="wrong">wrong</option><option value="unlabelled">no label</option><option value="failed">failed</option></select></label>
 <label>probability <input id="f-minp" type="number" min="0" max="1" step="0.05" value="0"> to
  <input id="f-maxp" type="number" min="0" max="1" step="0.05" value="1"></label>
 <label>sort <select id="f-sort"><option value="prob-desc">probability high &rarr; low</option>
  <option value="prob-asc">probability low &rarr; high (uncertain first)</option><option value="id">slide id</option>
  <option value="pred">predicted class</option><option value="truth">true class</option>{sorts}</select></label>
 <span id="gallery-count" class="muted">{len(cards)} slides</span>
</div>
<p class="muted">bars: class probabilities ({legend})</p>
<div id="gallery" class="gallery">{''.join(card_html(c, class_names) for c in cards)}</div>"""


def _settings_html(settings: dict[str, Any]) -> str:
    return "".join(f"<details><summary>{esc(name)}</summary><pre>{esc(json.dumps(obj, indent=2, default=str))}</pre>"
                   f"</details>" for name, obj in settings.items())


def render_page(page: ReportPage) -> str:
    """The whole page as a string."""
    sections = []
    if page.notes:
        sections.append("<section id='summary'><h2>Summary</h2><ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in page.notes)
                        + "</ul></section>")
    if page.metrics:
        sections.append("<section id='metrics'><h2>Metrics</h2>"
                        + "".join(metrics_html(h, r) for h, r in page.metrics) + "</section>")
    if page.cv_summary is not None:
        sections.append(f"<section id='cv'><h2>Cross-validation: test metrics per fold</h2>{cv_html(page.cv_summary)}"
                        "</section>")
    if page.calibration:
        sections.append(f"<section id='calibration'><h2>Calibration (temperature scaling)</h2>"
                        f"{calibration_html(page.calibration)}</section>")
    if page.plots:
        sections.append(f"<section id='plots'><h2>Plots</h2>{plots_html(page.plots)}</section>")
    if page.cards:
        sections.append(f"<section id='slides'><h2>Slides</h2>{gallery_html(page.cards, page.class_names)}</section>")
    if page.settings:
        sections.append(f"<section id='settings'><h2>Settings</h2>{_settings_html(page.settings)}</section>")
    titles = re.findall(r"<section id='([^']+)'><h2>([^<]+)</h2>", "".join(sections))
    nav = "".join(f"<a href='#{i}'>{esc(t.split(':')[0])}</a>" for i, t in titles)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(page.title)}</title>
<script>window.addEventListener("error", function (e) {{ document.documentElement.setAttribute("data-js-error", String(e.message)); }});</script>
<style>{PAGE_CSS}</style></head>
<body><header><h1>{esc(page.title)}</h1>
<p class="muted">{esc(page.kind)} &middot; {esc(page.source)}</p><nav>{nav}</nav></header>
<main>{''.join(sections)}</main>
<script>{PAGE_JS}</script></body></html>
"""
