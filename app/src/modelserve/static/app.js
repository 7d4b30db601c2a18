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

  var KEY_ITEM = "modelserve-api-key";
  form.elements.api_key.value = sessionStorage.getItem(KEY_ITEM) || "";

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var row;
    try { row = readRow(); } catch (e) { show(e.message, "error"); return; }
    button.disabled = true;
    show("Predicting…");
    var headers = { "Content-Type": "application/json", "Accept": "application/json" };
    var key = form.elements.api_key.value.trim();
    // The key stays in this tab (sessionStorage), never in a cookie or the page's URL.
    if (key) { headers["X-API-Key"] = key; sessionStorage.setItem(KEY_ITEM, key); }
    else { sessionStorage.removeItem(KEY_ITEM); }
    fetch("/api/v1/predict", {
      method: "POST",
      headers: headers,
      body: JSON.stringify({ row: row })
    }).then(function (resp) {
      return resp.json().then(function (body) { return { ok: resp.ok, status: resp.status, body: body }; });
    }).then(function (r) {
      if (!r.ok) {
        show("Error " + r.status + ": " + (r.body.error || "request failed") +
          (r.body.field ? " (" + r.body.field + ")" : "") +
          (r.status === 401 ? " (enter your API key above)" : ""), "error");
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

  // --- the served model: version, age, throughput and drift, from /api/v1/model every few seconds ---
  var STATUS_EVERY_MS = 3000;
  var COLUMNS = FEATURES.concat(["score"]);

  function text(id, value) { document.getElementById(id).textContent = value; }

  function age(seconds) {
    if (seconds === null || seconds === undefined) { return "unknown"; }
    var units = [[86400, "day"], [3600, "hour"], [60, "minute"]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][0]) {
        var n = Math.floor(seconds / units[i][0]);
        return n + " " + units[i][1] + (n === 1 ? "" : "s") + " ago";
      }
    }
    return Math.round(seconds) + " seconds ago";
  }

  function band(psi) {
    if (psi === null || psi === undefined) { return "unknown"; }
    return psi > 0.25 ? "significant" : (psi >= 0.1 ? "moderate" : "stable");
  }

  function drawDrift(drift) {
    var body = document.getElementById("drift-rows");
    while (body.firstChild) { body.removeChild(body.firstChild); }
    if (!drift || !drift.enabled) {
      text("drift-state", "off" + (drift && drift.reason ? " (" + drift.reason + ")" : ""));
      return;
    }
    var columns = drift.columns || {};
    var reported = COLUMNS.filter(function (c) { return columns[c]; });
    text("drift-state", reported.length
      ? drift.rows + " live rows in the window" + (drift.workers > 1 ? "s of " + drift.workers + " workers" : "")
      : "waiting for rows (" + drift.rows + " of " + drift.min_rows + " needed)");
    reported.forEach(function (c) {
      var psi = columns[c].psi, ks = columns[c].ks;
      var tr = document.createElement("tr");
      tr.id = "drift-" + c;
      tr.className = band(psi);
      tr.setAttribute("data-psi", psi);
      var name = document.createElement("td");
      name.textContent = c === "score" ? "score (prediction)" : c.replace(/_/g, " ");
      var value = document.createElement("td");
      value.className = "num psi";
      value.textContent = psi === null ? "–" : psi.toFixed(3);
      var gauge = document.createElement("td");
      var meter = document.createElement("meter");
      meter.min = 0; meter.max = 0.5; meter.low = 0.1; meter.high = 0.25; meter.optimum = 0;
      meter.value = Math.min(psi || 0, 0.5);
      meter.title = band(psi);
      gauge.appendChild(meter);
      var kstd = document.createElement("td");
      kstd.className = "num ks";
      kstd.textContent = ks === null ? "–" : ks.toFixed(3);
      [name, value, gauge, kstd].forEach(function (td) { tr.appendChild(td); });
      body.appendChild(tr);
    });
  }

  function refreshStatus() {
    fetch("/api/v1/model", { headers: { "Accept": "application/json" } }).then(function (r) {
      return r.json().then(function (m) { return { ok: r.ok, body: m }; });
    }).then(function (r) {
      var m = r.body;
      text("served-version", r.ok ? m.version : "unavailable");
      text("status-version", r.ok ? m.version : "no worker has a loadable model");
      text("status-age", r.ok ? age(m.age_seconds) : "–");
      text("status-throughput", r.ok && m.rows_per_second !== null && m.rows_per_second !== undefined
        ? m.rows_per_second.toFixed(1) + " predictions/s" : "–");
      drawDrift(r.ok ? m.drift : null);
      text("status-updated", "last at " + new Date().toLocaleTimeString());
    }).catch(function () {
      text("served-version", "unavailable");
      text("status-version", "unavailable");
    });
  }

  refreshStatus();
  setInterval(refreshStatus, STATUS_EVERY_MS);
  drawChart();
})();
