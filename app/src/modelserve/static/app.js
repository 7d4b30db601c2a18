"use strict";
(function () {
  var FEATURES = ["pregnancies", "glucose", "blood_pressure", "skin_thickness", "insulin", "bmi",
    "diabetes_pedigree", "age"];
  var MAX_POINTS = 30;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var history = [];
  var form = document.getElementById("patient");
  var result = document.getElementById("result");
  var button = document.getElementById("submit");
  var chart = document.getElementById("chart");

  function svg(name, attrs) {
    var el = document.createElementNS(SVG_NS, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    return el;
  }

  function drawChart() {
    while (chart.firstChild) { chart.removeChild(chart.firstChild); }
    var w = 600, h = 220, left = 30, bottom = 20, top = 10;
    var plotH = h - bottom - top;
    [0, 0.5, 1].forEach(function (v) {
      var y = top + plotH * (1 - v);
      chart.appendChild(svg("line", { x1: left, x2: w, y1: y, y2: y,
        "class": v === 0.5 ? "threshold" : "axis" }));
      var t = svg("text", { x: 2, y: y + 3, "class": "tick" });
      t.textContent = v.toFixed(1);
      chart.appendChild(t);
    });
    var slot = (w - left) / MAX_POINTS;
    history.forEach(function (p, i) {
      var bh = Math.max(1, plotH * p.probability);
      var rect = svg("rect", { x: left + i * slot + 2, y: top + plotH - bh, width: Math.max(2, slot - 4),
        height: bh, "class": p.label ? "bar positive" : "bar", "data-probability": p.probability });
      var tip = svg("title", {});
      tip.textContent = (100 * p.probability).toFixed(1) + "% (model " + p.version + ")";
      rect.appendChild(tip);
      chart.appendChild(rect);
    });
    document.getElementById("count").textContent = String(history.length);
  }

  function show(text, cls) {
    result.className = cls || "";
    result.textContent = "";
    if (typeof text === "string") { result.textContent = text; } else { result.appendChild(text); }
  }

  function readRow() {
    var row = {};
    for (var i = 0; i < FEATURES.length; i++) {
      var input = form.elements[FEATURES[i]];
      if (input.value.trim() === "" || !isFinite(Number(input.value))) {
        throw new Error(FEATURES[i] + " must be a number");
      }
      row[FEATURES[i]] = Number(input.value);
    }
    return row;
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var row;
    try { row = readRow(); } catch (e) { show(e.message, "error"); return; }
    button.disabled = true;
    show("Predicting…");
    fetch("/api/v1/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify({ row: row })
    }).then(function (resp) {
      return resp.json().then(function (body) { return { ok: resp.ok, status: resp.status, body: body }; });
    }).then(function (r) {
      if (!r.ok) {
        show("Error " + r.status + ": " + (r.body.error || "request failed") +
          (r.body.field ? " (" + r.body.field + ")" : ""), "error");
        return;
      }
      var p = r.body.prediction;
      var frag = document.createDocumentFragment();
      var strong = document.createElement("strong");
      strong.id = "probability";
      strong.textContent = (100 * p.probability).toFixed(1) + "%";
      frag.appendChild(document.createTextNode("Probability of diabetes: "));
      frag.appendChild(strong);
      frag.appendChild(document.createTextNode(" — " + (p.label ? "positive" : "negative") + " · model "));
      var ver = document.createElement("span");
      ver.id = "model-version";
      ver.textContent = r.body.model_version;
      frag.appendChild(ver);
      show(frag, p.label ? "positive" : "negative");
      history.push({ probability: p.probability, label: p.label, version: r.body.model_version });
      if (history.length > MAX_POINTS) { history.shift(); }
      drawChart();
    }).catch(function (e) {
      show("Request failed: " + e.message, "error");
    }).then(function () { button.disabled = false; });
  });

  fetch("/api/v1/model").then(function (r) { return r.json(); }).then(function (m) {
    document.getElementById("served-version").textContent = m.version || "unavailable";
  }).catch(function () {
    document.getElementById("served-version").textContent = "unavailable";
  });
  drawChart();
})();
