"""The viewer page of one slide, and the assets every viewer page shares.

A page is static HTML that needs no server: everything it would otherwise fetch (the DZI
descriptor, top tiles, tissue outline) is inline JSON in ``<script id="viewer-data">``, and
OpenSeadragon gets an inline DZI tile source, so no XHR is made; tiles, the overlay and the scripts
are plain ``<img>``/``<script>`` loads, which work from ``file://`` and from any static web server.

Shared assets go to ``REPORT/viewer/assets/``: OpenSeadragon as vendored in
``slidemil/report/viewer_assets/openseadragon/`` (with its licence and ``VENDORED.md``) and the
page's own script and stylesheet.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from slidemil.errors import ConfigError
from slidemil.report.html import esc, href

OSD_VERSION = "6.1.1"
ASSETS = "assets"


def copy_assets(viewer_dir: Path) -> Path:
    """Copy OpenSeadragon (with its licence) and the viewer's script and stylesheet to ``viewer_dir/assets``.

    Raises:
        ConfigError: the installation lacks them (package data of ``slidemil.report``).
    """
    src = resources.files("slidemil.report").joinpath("viewer_assets")
    dst = viewer_dir / ASSETS
    with resources.as_file(src) as folder:
        if not (Path(folder) / "openseadragon" / "openseadragon.min.js").is_file():
            raise ConfigError(f"{folder}: the viewer's assets are not installed (package data of slidemil.report); "
                              "reinstall slidemil")
        shutil.copytree(folder, dst, dirs_exist_ok=True)
    return dst


@dataclass(frozen=True)
class PageLinks:
    """Relative links of a viewer page: the report, and the previous and next viewers."""

    report: str = "../index.html#slides"
    prev: str | None = None
    next: str | None = None


def _json_script(obj: Any) -> str:
    """JSON that is safe inside ``<script>`` (no ``</`` or comment openers)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _prediction_html(pred: str, probs: dict[str, float | None], truth: str | None) -> str:
    rows = "".join(
        f"<tr{' class=pred' if c == pred else ''}><th>{esc(c)}</th><td class=num>"
        f"{'' if p is None else f'{p:.3f}'}</td><td class=barcell><span class='bar c{i % 10}' "
        f"style='width:{0 if p is None else 100 * p:.1f}%'></span></td></tr>"
        for i, (c, p) in enumerate(probs.items()))
    truth_html = f"<p>true class <b>{esc(truth)}</b></p>" if truth else ""
    return (f"<p class=big>predicted <b id=pred-class>{esc(pred) or '?'}</b></p>{truth_html}"
            f"<table class=probs>{rows}</table>")


def _attention(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def _topk_html(topk: list[dict[str, Any]]) -> str:
    if not topk:
        return "<p class=muted>no top tiles (topk/&lt;id&gt;/index.csv)</p>"
    items = "".join(
        f"<li><button type=button class=jump data-rank='{t['rank']}' title='x {t['x']:.0f}, y {t['y']:.0f}'>"
        + (f"<img src='{href(t['img'])}' alt='' loading=lazy width=48 height=48>" if t.get("img") else "")
        + f"<span>#{t['rank']} &middot; {_attention(t['attention'])}</span></button></li>" for t in topk)
    return f"<ol class=topk>{items}</ol>"


def render_viewer_page(data: dict[str, Any], pred: str, probs: dict[str, float | None], truth: str | None,
                       colorbar: list[str], links: PageLinks) -> str:
    """The HTML of one viewer page.

    Args:
        data: the inline JSON the script reads (``slide_id``, ``width``, ``height``, ``mpp``, ``dzi``,
            ``overlay``, ``tissue``, ``topk``, ``levels``).
        pred: predicted class.
        probs: class -> probability.
        truth: true class when known.
        colorbar: CSS colours of the overlay's colour map, low to high.
        links: the report and the neighbouring viewers.
    """
    sid = str(data["slide_id"])
    ov = data.get("overlay")
    lv = data["levels"]
    nav = " ".join(f"<a href='{href(h)}' id='{k}'>{label}</a>" for k, label, h in
                   (("prev", "&larr; previous", links.prev), ("next", "next &rarr;", links.next)) if h)
    if ov:
        gradient = ", ".join(colorbar)
        heat = (f"<label>heatmap opacity <input id=opacity type=range min=0 max=100 value=50></label>"
                f"<div class=colorbar style='background:linear-gradient(to right, {gradient})'></div>"
                f"<div class=ticks><span>{ov['min']:.3g}</span><span>attention ({esc(ov['norm'])})</span>"
                f"<span>{ov['max']:.3g}</span></div>")
    else:
        heat = "<p class=muted>no attention on tissue: no overlay</p>"
    toggles = "".join(f"<label><input type=checkbox id='show-{k}' checked> {label}</label>" for k, label in
                      (("heatmap", "heatmap"), ("tissue", "tissue outline"), ("markers", "top tiles")))
    info = (f"{data['width']} &times; {data['height']} px at {data['mpp']:.3f} &micro;m/px; "
            f"pyramid to {lv['cap_mpp']:.3g} &micro;m/px (level {lv['cap']} of {lv['max']}), "
            f"{lv['tiles']} tiles")
    tissue_note = "" if data.get("tissue") else "<p class=muted>no tissue annotations (geojson/&lt;id&gt;.annotations.geojson)</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(sid)} &middot; slidemil viewer</title><link rel="icon" href="data:,">
<script>window.addEventListener("error", function (e) {{ document.documentElement.setAttribute("data-js-error", String(e.message)); }});</script>
<link rel="stylesheet" href="{ASSETS}/slidemil-viewer.css"></head>
<body><header><a href="{esc(links.report)}" id="back">&larr; report</a><h1>{esc(sid)}</h1>
<span class="muted">{info}</span><nav>{nav}</nav></header>
<div id="layout"><aside id="panel">
<section>{_prediction_html(pred, probs, truth)}</section>
<section>{heat}<div class=toggles>{toggles}</div>{tissue_note}</section>
<section><h2>Top tiles</h2>{_topk_html(data.get('topk', []))}</section>
<section class=muted>Drag to pan, scroll to zoom; click a tile to go to it. The view is kept in the address.
Viewer: <a href="{ASSETS}/openseadragon/LICENSE.txt">OpenSeadragon {OSD_VERSION}</a> (BSD-3-Clause).</section>
</aside><main id="stage"><div id="osd"></div></main></div>
<script type="application/json" id="viewer-data">{_json_script(data)}</script>
<script src="{ASSETS}/openseadragon/openseadragon.min.js"></script>
<script src="{ASSETS}/slidemil-viewer.js"></script>
</body></html>
"""
