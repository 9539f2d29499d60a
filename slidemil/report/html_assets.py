"""The report page's stylesheet and script, inlined into every page (the page needs no network)."""

PAGE_CSS = """
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

PAGE_JS = r"""
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
