/* Token Kiosk dashboard: draws the charts (uPlot) from the JSON blocks the pages carry, and
   the copy button of a new key's secret. No inline script anywhere: the CSP forbids it. */
(function () {
  "use strict";
  var COLORS = ["#2459d6", "#b42318", "#067647", "#b54708", "#6941c6", "#0e7090", "#c11574"];

  function draw(el) {
    var block = document.getElementById(el.getAttribute("data-chart"));
    if (!block) return;
    var data = JSON.parse(block.textContent);
    var series = [{}];
    var columns = [data.x];
    data.series.forEach(function (s, i) {
      series.push({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2,
        fill: data.series.length === 1 ? COLORS[0] + "22" : undefined });
      columns.push(s.values);
    });
    var width = function () { return Math.max(200, el.clientWidth); };
    var plot = new uPlot({ width: width(), height: 200, series: series,
      scales: { x: { time: true } }, axes: [{}, { size: 60 }] }, columns, el);
    window.addEventListener("resize", function () { plot.setSize({ width: width(), height: 200 }); });
  }

  function copy(button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    var done = button.parentNode.querySelector(".copied");
    button.addEventListener("click", function () {
      var text = source.textContent;
      var shown = function () { if (done) done.hidden = false; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(shown, function () { select(source); });
      } else {
        select(source);
        shown();
      }
    });
  }

  function select(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-chart]").forEach(draw);
    document.querySelectorAll("[data-copy]").forEach(copy);
  });
})();
