// Small SVG line charts drawn with DOM calls only (no HTML parsing, no library).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmtAxis(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 0.01) return v.toFixed(3);
  return v.toExponential(1);
}

// series: [{points: [[x, y], ...], cls: "s1", dots: bool}]; opts: {yMin, yMax, yUnit, empty}
function drawChart(svg, series, opts) {
  opts = opts || {};
  const w = Math.max(200, svg.clientWidth || 600), h = Math.max(120, svg.clientHeight || 200);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (!pts.length) {
    svg.appendChild(svgEl("text", {x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty"}, opts.empty || "no data yet"));
    return;
  }
  const pad = {l: 48, r: 10, t: 10, b: 22};
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...pts.map(p => p[1]));
  let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;  // one point: start the axis at it, never at a negative step
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  if (opts.yMin === undefined) {  // keep lines off the frame, but never below zero for data that cannot be
    const m = (y1 - y0) * 0.05;
    y0 = y0 >= 0 ? Math.max(0, y0 - m) : y0 - m;
    y1 += m;
  }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4, y = Y(v);
    svg.appendChild(svgEl("line", {x1: pad.l, x2: w - pad.r, y1: y, y2: y, class: "grid"}));
    svg.appendChild(svgEl("text", {x: pad.l - 4, y: y + 4, "text-anchor": "end", class: "axis"}, fmtAxis(v) + (opts.yUnit || "")));
  }
  svg.appendChild(svgEl("text", {x: pad.l, y: h - 6, class: "axis"}, "step " + Math.round(x0)));
  svg.appendChild(svgEl("text", {x: w - pad.r, y: h - 6, "text-anchor": "end", class: "axis"}, "step " + Math.round(x1)));
  for (const s of series) {
    const p = s.points.filter(q => Number.isFinite(q[0]) && Number.isFinite(q[1]));
    if (!p.length) continue;
    if (!s.dotsOnly) {
      const d = p.map((q, i) => (i ? "L" : "M") + X(q[0]).toFixed(1) + " " + Y(q[1]).toFixed(1)).join(" ");
      svg.appendChild(svgEl("path", {d, class: "line " + s.cls}));
    }
    if (s.dots || s.dotsOnly || p.length === 1) {  // a lone point draws no visible line
      for (const q of p) {
        const c = svgEl("circle", {cx: X(q[0]), cy: Y(q[1]), r: 3, class: "dot " + s.cls});
        c.appendChild(svgEl("title", {}, `step ${q[0]}: ${fmtAxis(q[1])}${opts.yUnit || ""}`));
        svg.appendChild(c);
      }
    }
  }
}

window.UTCharts = {drawChart};
