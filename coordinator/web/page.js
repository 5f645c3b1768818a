// The coordinator's live page: polls /status and /history.json and redraws; no library, no build step.
// Every string a peer reports (peer id, hardware, version) is untrusted: it reaches the page through textContent
// and setAttribute only, never as HTML.
"use strict";

const POLL_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 560, height: 220, left: 48, right: 12, top: 10, bottom: 28 };

function byId(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  byId(id).textContent = text;
}

function number(value, digits) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
}

function count(value) {
  return typeof value === "number" && isFinite(value) ? Math.round(value).toLocaleString("en-US") : "–";
}

function shortId(id) {
  const text = String(id || "");
  return text.length > 14 ? text.slice(0, 6) + "…" + text.slice(-6) : text;
}

function ago(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
  if (seconds < 60) return Math.max(0, Math.round(seconds)) + " s ago";
  return Math.round(seconds / 60) + " min ago";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

function niceRange(values, zeroBased) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (zeroBased) low = Math.min(0, low);
  if (high === low) {
    high += 1;
    low = zeroBased ? low : low - 1;
  }
  return [low, high];
}

// A line chart of [x, y] points; ``fixedY`` pins the y range (accuracy: 0 to 1).
function drawChart(svg, points, fixedY, withDots) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  svg.setAttribute("data-points", String(points.length));
  if (points.length === 0) {
    const empty = svgElement("text", { x: CHART.width / 2, y: CHART.height / 2, "text-anchor": "middle" });
    empty.textContent = "no data yet";
    svg.appendChild(empty);
    return;
  }
  const [x0, x1] = niceRange(points.map((p) => p[0]), true);
  const [y0, y1] = fixedY || niceRange(points.map((p) => p[1]), true);
  const sx = (x) => CHART.left + ((x - x0) / (x1 - x0)) * plotWidth;
  const sy = (y) => CHART.top + plotHeight - ((y - y0) / (y1 - y0)) * plotHeight;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.appendChild(svgElement("line", { class: "grid", x1: CHART.left, x2: CHART.width - CHART.right, y1: sy(y), y2: sy(y) }));
    const label = svgElement("text", { x: CHART.left - 6, y: sy(y) + 4, "text-anchor": "end" });
    label.textContent = y1 - y0 >= 10 ? y.toFixed(0) : y.toFixed(2);
    svg.appendChild(label);
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    const label = svgElement("text", { x: sx(x), y: CHART.height - 8, "text-anchor": "middle" });
    label.textContent = x.toFixed(0);
    svg.appendChild(label);
  }
  svg.appendChild(svgElement("line", { class: "axis", x1: CHART.left, x2: CHART.left, y1: CHART.top, y2: CHART.top + plotHeight }));
  svg.appendChild(svgElement("line", { class: "axis", x1: CHART.left, x2: CHART.width - CHART.right, y1: CHART.top + plotHeight, y2: CHART.top + plotHeight }));
  const path = points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
  svg.appendChild(svgElement("polyline", { class: "series", points: path }));
  if (withDots || points.length === 1) {
    for (const p of points) svg.appendChild(svgElement("circle", { class: "dot", cx: sx(p[0]), cy: sy(p[1]), r: 3 }));
  }
}

function drawStatus(status) {
  setText("run-id", status.run_id || "");
  setText("algorithm", (status.algorithm || "") + " · config " + (status.config_hash || ""));
  document.title = "vitpeer swarm " + (status.run_id || "");
  const step = status.swarm_epoch;
  setText("step", step === null || step === undefined ? "–" : String(step));
  setText("max-steps", status.max_steps ? String(status.max_steps) : "–");
  const progress = byId("progress");
  progress.max = status.max_steps || 1;
  progress.value = Math.min(step || 0, progress.max);
  setText("samples-per-second", number(status.samples_per_second, 1));
  setText("alive-peers", count(status.alive_peers));
  setText("loss", number(status.loss, 4));
  const url = status.url || window.location.origin;
  setText("join-line", "vitpeer join --coordinator " + url);

  const peers = Array.isArray(status.peers) ? status.peers : [];
  setText("peer-count", "(" + peers.length + ")");
  const body = byId("peers").tBodies[0];
  const rows = document.createDocumentFragment();
  for (const peer of peers) {
    const row = document.createElement("tr");
    const key = String(peer.signer || peer.peer_id || "");
    row.setAttribute("data-signer", key);
    if (peer.seconds_since_report > 30) row.className = "stale";
    const name = cell(row, shortId(peer.peer_id), "mono");
    name.title = "claims peer id " + String(peer.peer_id || "") + "; signed by " + key;
    cell(row, String(peer.hardware || ""), "hardware");
    cell(row, String(peer.step ?? "–"), "num");
    cell(row, number(peer.samples_per_second, 1), "num");
    cell(row, count(peer.samples), "num");
    cell(row, ago(peer.seconds_since_report), "num");
    cell(row, String(peer.version || ""));
    rows.appendChild(row);
  }
  body.replaceChildren(rows);

  const checkpoints = status.checkpoints || {};
  const ckBody = byId("checkpoints").tBodies[0];
  const ckRows = document.createDocumentFragment();
  for (const [label, sidecar] of [["newest", checkpoints.newest], ["best", checkpoints.best]]) {
    if (!sidecar) continue;
    const row = document.createElement("tr");
    cell(row, label);
    cell(row, String(sidecar.swarm_epoch), "num");
    cell(row, number(sidecar.val_accuracy, 4), "num");
    cell(row, number(sidecar.val_loss, 4), "num");
    cell(row, String(sidecar.time_utc || ""));
    cell(row, String(sidecar.file || ""), "mono");
    ckRows.appendChild(row);
  }
  ckBody.replaceChildren(ckRows);
  byId("downloads").hidden = !checkpoints.best;
  byId("no-checkpoint").hidden = Boolean(checkpoints.newest);
  setText("best-accuracy", checkpoints.best ? number(checkpoints.best.val_accuracy, 4) : "–");
}

function drawHistory(history) {
  const losses = (history.points || []).filter((p) => typeof p.loss === "number").map((p) => [p.swarm_epoch, p.loss]);
  drawChart(byId("loss-chart"), losses, null, false);
  const scores = (history.evaluations || [])
    .filter((e) => typeof e.val_accuracy === "number")
    .map((e) => [e.swarm_epoch, e.val_accuracy]);
  drawChart(byId("accuracy-chart"), scores, [0, 1], true);
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  const updated = byId("updated");
  try {
    const [status, history] = await Promise.all([getJson("/status"), getJson("/history.json")]);
    drawStatus(status);
    drawHistory(history);
    updated.className = "muted";
    updated.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    updated.className = "error";
    updated.textContent = "coordinator not answering (" + err.message + "); retrying";
  }
  setTimeout(refresh, POLL_MS);
}

function copyJoinLine() {
  const text = byId("join-line").textContent;
  if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
}

document.addEventListener("DOMContentLoaded", () => {
  byId("copy").addEventListener("click", copyJoinLine);
  refresh();
});
