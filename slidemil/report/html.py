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
        image = f"<a href='{href(card.heatmap)}'>{img}</a>" if card.heatmap else img
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
                     (("heatmap", card.heatmap), ("top-k tiles", card.topk), ("GeoJSON", card.geojson)) if path)
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
<style>{_CSS}</style></head>
<body><header><h1>{esc(page.title)}</h1>
<p class="muted">{esc(page.kind)} &middot; {esc(page.source)}</p><nav>{nav}</nav></header>
<main>{''.join(sections)}</main>
<script>{_JS}</script></body></html>
"""


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:21px}nav a{color:#fff;margin-right:14px;font-size:13px}header .muted{color:#c9d6e3}
main{padding:8px 24px 40px}section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;margin:16px 0;padding:4px 18px 14px}
h2{font-size:17px;margin:12px 0 8px}h3{font-size:15px;margin:12px 0 4px}.muted{color:#667;font-size:12.5px}
.tables{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
table.metrics{border-collapse:collapse;font-size:13px}table.metrics th,table.metrics td{padding:3px 9px;border-bottom:1px solid #eceef1;text-align:left}
table.metrics thead th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ci{color:#556;font-size:12px;font-variant-numeric:tabular-nums;white-space:nowrap}caption{font-size:12px;color:#556;text-align:left}
.warn{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:6px 12px;margin-top:10px;font-size:13px}
.warn ul{margin:4px 0;padding-left:18px}.notes{margin:6px 0;padding-left:18px}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.plots figure{margin:0;max-width:400px;border:1px solid #eceef1;border-radius:6px;padding:6px}
.plots figure.wide{max-width:820px}.plots img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#445}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:6px 0;position:sticky;top:0;background:#fff;padding:6px 0;z-index:2}
.controls input[type=number]{width:4.2em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{border:1px solid #dfe3e8;border-radius:7px;overflow:hidden;background:#fff;display:flex;flex-direction:column}
.card[hidden]{display:none}.card.wrong{border-color:#d9534f;box-shadow:0 0 0 1px #d9534f inset}.card.failed{background:#fbf1f1}
.card img{width:100%;height:170px;object-fit:contain;background:#eef0f3;display:block}
.nothumb{height:170px;display:flex;align-items:center;justify-content:center;background:#eef0f3;color:#889}
.meta{padding:6px 8px;font-size:12.5px;display:flex;flex-direction:column;gap:3px}
.sid{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.err{color:#a33;font-size:12px;word-break:break-word}
.badge{font-weight:500;font-size:11px;padding:0 5px;border-radius:8px;margin-left:4px}
.badge.correct{background:#e3f4e6;color:#1e7b34}.badge.wrong{background:#fbe3e2;color:#b02a25}
.badge.unlabelled{background:#eef0f3;color:#556}.badge.failed{background:#b02a25;color:#fff}
.bar{display:flex;height:6px;border-radius:3px;overflow:hidden;background:#eef0f3}.bar span{display:block;height:100%}
.key{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 3px 0 8px;vertical-align:middle}
.c0{background:#1f77b4}.c1{background:#ff7f0e}.c2{background:#2ca02c}.c3{background:#d62728}.c4{background:#9467bd}
.c5{background:#8c564b}.c6{background:#e377c2}.c7{background:#7f7f7f}.c8{background:#bcbd22}.c9{background:#17becf}
.links a{margin-right:6px}a{color:#1f5f99}pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
"""

_JS = r"""
(function () {
  "use strict";
  var gallery = document.getElementById("gallery");
  if (!gallery) { return; }
  var cards = Array.prototype.slice.call(gallery.querySelectorAll(".card"));
  var ids = ["pred", "truth", "correct", "minp", "maxp", "sort"];
  var inputs = {};
  ids.forEach(function (k) { inputs[k] = document.getElementById("f-" + k); });
  var count = document.getElementById("gallery-count");

  function num(s, fallback) { var v = parseFloat(s); return isNaN(v) ? fallback : v; }

  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
      var kv = pair.split("=");
      var el = inputs[decodeURIComponent(kv[0] || "")];
      if (el && kv.length === 2) { el.value = decodeURIComponent(kv[1]); }
    });
  }

  function sortKey(card, sort) {
    var d = card.dataset;
    if (sort === "id") { return d.id; }
    if (sort === "pred") { return d.pred + "\u0000" + d.id; }
    if (sort === "truth") { return d.truth + "\u0000" + d.id; }
    var m = /^p(\d+)-desc$/.exec(sort);
    if (m) { return -num(d.probs.split(",")[+m[1]], -1); }
    var p = num(d.prob, -1);
    return sort === "prob-asc" ? (p < 0 ? 2 : p) : -p;
  }

  function compare(sort) {
    return function (a, b) {
      var ka = sortKey(a, sort), kb = sortKey(b, sort);
      if (ka < kb) { return -1; }
      if (ka > kb) { return 1; }
      return a.dataset.id < b.dataset.id ? -1 : (a.dataset.id > b.dataset.id ? 1 : 0);
    };
  }

  function apply(keepHash) {
    var v = {};
    ids.forEach(function (k) { v[k] = inputs[k].value; });
    var lo = num(v.minp, 0), hi = num(v.maxp, 1), shown = 0;
    cards.forEach(function (c) {
      var d = c.dataset, p = num(d.prob, NaN);
      var ok = (v.pred === "all" || d.pred === v.pred) && (v.truth === "all" || d.truth === v.truth) &&
        (v.correct === "all" || d.correct === v.correct) &&
        (isNaN(p) ? (lo <= 0 && hi >= 1) : (p >= lo - 1e-9 && p <= hi + 1e-9));
      c.hidden = !ok;
      if (ok) { shown += 1; }
    });
    var frag = document.createDocumentFragment();
    cards.slice().sort(compare(v.sort)).forEach(function (c) { frag.appendChild(c); });
    gallery.appendChild(frag);
    count.textContent = shown + " of " + cards.length + " slides shown";
    document.body.setAttribute("data-gallery-cards", String(cards.length));
    document.body.setAttribute("data-gallery-shown", String(shown));
    if (!keepHash) {
      location.replace("#" + ids.map(function (k) {
        return encodeURIComponent(k) + "=" + encodeURIComponent(v[k]);
      }).join("&"));
    }
  }

  readHash();
  ids.forEach(function (k) { inputs[k].addEventListener("input", function () { apply(false); }); });
  window.addEventListener("hashchange", function () { readHash(); apply(true); });
  apply(true);
})();
"""
