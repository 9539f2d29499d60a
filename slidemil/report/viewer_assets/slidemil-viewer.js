/* slidemil viewer page: OpenSeadragon on the slide's sparse DZI pyramid, with an SVG layer on top
 * holding the attention overlay and the tissue outline (in level-0 pixels, one transform) and the top
 * tiles (markers kept at a readable size on screen).
 *
 * Data: the inline JSON of <script id="viewer-data"> (no XHR; the page works from file://).
 * Address: #x=<cx>&y=<cy>&w=<width> (level-0 px) sets the view and is kept up to date; o=<0..1> the
 * overlay opacity; "audit" lists per level the tiles the tile source says exist (data-exists).
 * State for tests and tools on <html>: data-osd-open, data-fully-loaded, data-tiles-loaded,
 * data-tiles-failed, data-max-tile-level, data-image-rect (left,top,width,height of the whole image
 * in page px), data-viewer-rect (the viewer's), data-js-error.
 */
(function () {
  "use strict";
  var OSD = window.OpenSeadragon;
  var root = document.documentElement;
  var SVGNS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("viewer-data").textContent);
  var W = data.width, H = data.height;
  var stats = { loaded: 0, failed: 0, maxLevel: -1 };
  var hash = parseHash();
  var opacity = clamp(parseFloat(hash.o), 0, 1, 0.5);

  function clamp(v, lo, hi, fallback) { return isFinite(v) ? Math.min(hi, Math.max(lo, v)) : fallback; }

  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
      if (!pair) { return; }
      var kv = pair.split("=");
      out[decodeURIComponent(kv[0])] = kv.length > 1 ? decodeURIComponent(kv[1]) : "";
    });
    return out;
  }

  function writeHash() {
    var keys = Object.keys(hash);
    var text = keys.map(function (k) {
      return hash[k] === "" ? encodeURIComponent(k) : encodeURIComponent(k) + "=" + encodeURIComponent(hash[k]);
    }).join("&");
    if (window.history && history.replaceState) {
      try { history.replaceState(null, "", "#" + text); } catch (e) { /* file:// in some browsers */ }
    }
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVGNS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function publish() {
    root.setAttribute("data-tiles-loaded", String(stats.loaded));
    root.setAttribute("data-tiles-failed", String(stats.failed));
    root.setAttribute("data-max-tile-level", String(stats.maxLevel));
  }

  var viewer = OSD({
    element: document.getElementById("osd"),
    prefixUrl: "assets/openseadragon/images/",
    tileSources: data.dzi,
    drawer: "canvas",
    crossOriginPolicy: false,
    loadTilesWithAjax: false,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    showRotationControl: false,
    maxZoomPixelRatio: 4,
    minZoomImageRatio: 0.5,
    visibilityRatio: 0.2,
    timeout: 60000
  });
  window.slidemilViewer = viewer;

  // -- the SVG layer ------------------------------------------------------------------------
  var svg = el("svg", { "class": "layer", "aria-hidden": "true" });
  var imageGroup = el("g", {}, svg);
  var heat = null;
  if (data.overlay) {
    heat = el("image", { href: data.overlay.href, x: data.overlay.x, y: data.overlay.y,
      width: data.overlay.width, height: data.overlay.height, preserveAspectRatio: "none",
      opacity: String(opacity), "class": "heat" }, imageGroup);
  }
  var tissue = null;
  if (data.tissue && data.tissue.length) {
    var d = data.tissue.map(function (ring) {
      return "M" + ring.map(function (p) { return p[0].toFixed(1) + " " + p[1].toFixed(1); }).join("L") + "Z";
    }).join("");
    tissue = el("path", { d: d, "class": "tissue", "fill-rule": "evenodd", "vector-effect": "non-scaling-stroke" },
      imageGroup);
  }
  var markerGroup = el("g", { "class": "markers" }, svg);
  var markers = (data.topk || []).map(function (t) {
    var g = el("g", { "class": "marker", "data-rank": String(t.rank) }, markerGroup);
    var title = el("title", {}, g);
    title.textContent = "#" + t.rank + " attention " + (t.attention === null ? "-" : t.attention.toFixed(3));
    var box = el("rect", {}, g);
    var label = el("text", {}, g);
    label.textContent = String(t.rank);
    ["pointerdown", "pointerup", "mousedown", "mouseup", "touchstart", "dblclick"].forEach(function (name) {
      g.addEventListener(name, function (e) { e.stopPropagation(); });
    });
    g.addEventListener("click", function (e) { e.stopPropagation(); goTo(t); });
    return { tile: t, box: box, label: label };
  });

  function goTo(t) {
    var pad = t.size * 2;
    viewer.viewport.fitBounds(viewer.viewport.imageToViewportRectangle(t.x - pad, t.y - pad, t.size + 2 * pad,
      t.size + 2 * pad));
  }

  function redraw() {
    var vp = viewer.viewport;
    var p0 = vp.imageToViewerElementCoordinates(new OSD.Point(0, 0));
    var p1 = vp.imageToViewerElementCoordinates(new OSD.Point(W, 0));
    var s = (p1.x - p0.x) / W;
    imageGroup.setAttribute("transform", "matrix(" + s + ",0,0," + s + "," + p0.x + "," + p0.y + ")");
    markers.forEach(function (m) {
      var t = m.tile, side = Math.max(t.size * s, 16);
      var cx = p0.x + (t.x + t.size / 2) * s, cy = p0.y + (t.y + t.size / 2) * s;
      m.box.setAttribute("x", (cx - side / 2).toFixed(1));
      m.box.setAttribute("y", (cy - side / 2).toFixed(1));
      m.box.setAttribute("width", side.toFixed(1));
      m.box.setAttribute("height", side.toFixed(1));
      m.label.setAttribute("x", cx.toFixed(1));
      m.label.setAttribute("y", (cy - side / 2 - 3).toFixed(1));
    });
    var b = viewer.element.getBoundingClientRect();
    var fmt = function (v) { return v.toFixed(2); };
    root.setAttribute("data-image-rect", [b.left + p0.x, b.top + p0.y, W * s, H * s].map(fmt).join(","));
    root.setAttribute("data-viewer-rect", [b.left, b.top, b.width, b.height].map(fmt).join(","));
  }

  function keepViewInHash() {
    var r = viewer.viewport.viewportToImageRectangle(viewer.viewport.getBounds(true));
    hash.x = String(Math.round(r.x + r.width / 2));
    hash.y = String(Math.round(r.y + r.height / 2));
    hash.w = String(Math.round(r.width));
    writeHash();
  }

  function applyHashView() {
    var x = parseFloat(hash.x), y = parseFloat(hash.y), w = parseFloat(hash.w);
    if (!(isFinite(x) && isFinite(y) && isFinite(w) && w > 0)) { return; }
    var size = viewer.viewport.getContainerSize();
    var h = w * size.y / Math.max(size.x, 1);
    viewer.viewport.fitBounds(viewer.viewport.imageToViewportRectangle(x - w / 2, y - h / 2, w, h), true);
  }

  function audit(source) {
    var out = [];
    for (var level = 0; level <= source.maxLevel; level++) {
      var n = source.getNumTiles(level), count = 0;
      for (var x = 0; x < n.x; x++) {
        for (var y = 0; y < n.y; y++) { if (source.tileExists(level, x, y)) { count++; } }
      }
      out.push(level + ":" + count);
    }
    root.setAttribute("data-exists", out.join(","));
  }

  viewer.addHandler("open", function () {
    var item = viewer.world.getItemAt(0);
    viewer.canvas.appendChild(svg);
    item.addHandler("fully-loaded-change", function (e) {
      root.setAttribute("data-fully-loaded", e.fullyLoaded ? "1" : "0");
    });
    applyHashView();
    redraw();
    if ("audit" in hash) { audit(item.source); }
    root.setAttribute("data-osd-open", "1");
  });
  viewer.addHandler("open-failed", function (e) {
    root.setAttribute("data-js-error", "OpenSeadragon could not open the slide: " + e.message);
  });
  viewer.addHandler("tile-loaded", function (e) {
    stats.loaded += 1;
    stats.maxLevel = Math.max(stats.maxLevel, e.tile.level);
    publish();
  });
  viewer.addHandler("tile-load-failed", function (e) {
    stats.failed += 1;
    publish();
    root.setAttribute("data-tile-error", String(e.message || "tile failed") + " " + (e.tile ? e.tile.getUrl() : ""));
  });
  viewer.addHandler("update-viewport", redraw);
  viewer.addHandler("resize", redraw);
  viewer.addHandler("animation-finish", keepViewInHash);

  // -- the panel ----------------------------------------------------------------------------
  var slider = document.getElementById("opacity");
  if (slider && heat) {
    slider.value = String(Math.round(opacity * 100));
    slider.addEventListener("input", function () {
      heat.setAttribute("opacity", String(slider.value / 100));
      hash.o = String(slider.value / 100);
      writeHash();
    });
  }
  [["show-heatmap", heat], ["show-tissue", tissue], ["show-markers", markerGroup]].forEach(function (pair) {
    var box = document.getElementById(pair[0]);
    if (!box) { return; }
    if (!pair[1]) { box.disabled = true; box.checked = false; return; }
    box.addEventListener("change", function () { pair[1].style.display = box.checked ? "" : "none"; });
  });
  Array.prototype.forEach.call(document.querySelectorAll("button.jump"), function (button) {
    button.addEventListener("click", function () {
      var rank = parseInt(button.getAttribute("data-rank"), 10);
      (data.topk || []).forEach(function (t) { if (t.rank === rank) { goTo(t); } });
    });
  });
  publish();
}());
