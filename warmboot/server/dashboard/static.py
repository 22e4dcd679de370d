"""The dashboard's only stylesheet and script, served from ``/_dashboard/static/`` (kept here as text so that
they ship inside the Python package, and so that the pages need no inline script: the Content-Security-Policy
allows scripts and styles from the dashboard itself only)."""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1b1f23; background: #fafbfc; }
header { background: #24292e; padding: 8px 16px; }
header a { color: #fff; margin-right: 18px; text-decoration: none; font-weight: 600; }
main { padding: 12px 20px; max-width: 1200px; }
h1 { font-size: 20px; margin: 10px 0; } h2 { font-size: 16px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 14px; background: #fff; }
th, td { border: 1px solid #e1e4e8; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1e8449; } .bad { color: #c0392b; } .muted { color: #6a737d; }
pre#log { background: #0d1117; color: #c9d1d9; padding: 10px; max-height: 70vh; overflow: auto; white-space: pre-wrap; }
svg.chart { background: #fff; border: 1px solid #e1e4e8; margin: 6px 0; }
svg .title { font-weight: 600; font-size: 13px; } svg .tick, svg .note { font-size: 11px; fill: #6a737d; }
svg .label, svg .kind { font-size: 12px; } svg .axis { stroke: #444; } svg .grid { stroke: #eee; }
svg .series { stroke-width: 1.5; }
code { background: #f3f4f6; padding: 1px 4px; }
"""

#: Polls the app's log for lines after the last offset it has and appends them as text (never as HTML).
TAIL = """
(function () {
  var pre = document.getElementById("log");
  if (!pre) { return; }
  var url = pre.dataset.api;
  var offset = parseInt(pre.dataset.offset, 10);
  function poll() {
    fetch(url + "?after=" + offset, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        if (data.lines.length) {
          var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.appendChild(document.createTextNode(data.lines.join("\\n") + "\\n"));
          if (atEnd) { pre.scrollTop = pre.scrollHeight; }
        }
        offset = data.next;
        document.getElementById("tail-state").textContent = "live";
      })
      .catch(function () { document.getElementById("tail-state").textContent = "reconnecting"; })
      .then(function () { setTimeout(poll, 1000); });
  }
  poll();
})();
"""
